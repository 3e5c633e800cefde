"""Human evaluation and curation of generated text: ``gpt2lab review``.

- :mod:`.reviewset`: the review file (which texts to judge, from which hidden sources) and ``make``;
- :mod:`.screening`: automatic pre-screening shown beside each item (repetition, near-duplicates,
  blocklist matches);
- :mod:`.log`: the crash-safe append-only JSONL log of judgements;
- :mod:`.app`: the browser page and its JSON API (``create_app``);
- :mod:`.stats` / :mod:`.summary`: win rates, Bradley-Terry, mean ratings, agreement, report;
- :mod:`.curate`: the curated dataset of an ``augment`` output.

The file formats are documented in docs/review.md.
"""

from .log import JudgementLog, read_log
from .reviewset import MODES, ReviewSet, read_review_set, write_review_set

__all__ = ["MODES", "JudgementLog", "ReviewSet", "read_log", "read_review_set", "write_review_set"]
