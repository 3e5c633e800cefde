"""Structured outputs: hold a completion to a JSON Schema, a regular expression, a list of choices or a grammar.

:class:`StructuredOutputsParams` says what shape, with the fields of vLLM's ``StructuredOutputsParams``
(``json``, ``regex``, ``choice``, ``grammar``, ``json_object``, ``whitespace_pattern``,
``disable_any_whitespace``, ``disable_additional_properties``, ``disable_fallback``). The grammar engine is `llguidance <https://github.com/guidance-ai/llguidance>`_
(the optional ``structured`` extra, imported on first use): :meth:`StructuredOutputsParams.validate` turns the
spec into llguidance's grammar and checks it, raising ``ValueError`` naming the field
(``structured_outputs.json: ...``) before any work. :func:`compiled_matcher` compiles it for a tokenizer
once (cached by grammar text); each constrained sequence matches with its own copy
(:class:`~.constraint.GrammarState`), and :class:`~.constraint.StructuredOutput` is the logits transform
that masks what the grammar forbids.

JSON whitespace: llguidance lets a schema's output hold any whitespace between tokens, which a small model
fills with endless newlines; here a JSON value is written as ``json.dumps`` writes it (``", "`` between
items, ``": "`` after keys, no other whitespace) unless ``disable_any_whitespace`` (``","`` and ``":"``,
vLLM's compact form) or ``whitespace_pattern`` (a regex for the whitespace allowed between tokens,
vLLM's meaning) says otherwise.

Why llguidance rather than xgrammar (both are vLLM backends; measured on GPT-2's 50257-token vocabulary,
``benchmarks/structured.py --engines``): both mask a JSON-schema step in tens of microseconds, far below a
decode step; llguidance imports in 0.1 s with no dependencies (xgrammar pulls in transformers and triton and
imports in seconds, which every ``gpt2lab`` command would pay), compiles lazily (a new schema costs
milliseconds) and bounds the work a hostile grammar can cause (its parser limits), which a server needs.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

EXTRA_HINT = ("structured outputs need the optional 'structured' dependencies (llguidance not installed); "
              "install them with: pip install 'gpt2lab[structured]'")
KINDS = ("json", "regex", "choice", "grammar", "json_object")
# json.dumps' own separators: how GPT-2 saw most JSON written, and no room for runaway whitespace
DEFAULT_SEPARATORS = (", ", ": ")
COMPACT_SEPARATORS = (",", ":")
_MAX_CACHED = 64  # compiled grammars kept per tokenizer


def llguidance() -> Any:
    """The llguidance module; ``ImportError`` naming the extra to install when it is not there."""
    try:
        import llguidance as llg
    except ImportError:
        raise ImportError(EXTRA_HINT) from None
    return llg


def parser_limits() -> Any:
    """llguidance's per-grammar work bounds (its defaults, written out: a grammar that needs more fails
    with an error instead of stalling the caller). See llguidance's ``LLParserLimits``."""
    return llguidance().LLParserLimits(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                                       step_max_items=50_000, max_lexer_states=250_000, max_grammar_size=500_000,
                                       verbose_errors=False)


def one_line(message: str, limit: int = 400) -> str:
    """An engine message (often several lines, with a caret under the spot) as one line of at most ``limit``."""
    text = re.sub(r"\s+", " ", message).strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class StructuredOutputsParams:
    """The shape a completion must have: exactly one of ``json``, ``regex``, ``choice``, ``grammar``,
    ``json_object`` (vLLM's ``StructuredOutputsParams``).

    - ``json``: a JSON Schema (a dict, or its JSON text), or ``True`` for any JSON object;
    - ``regex``: the whole completion matches it (Rust ``regex`` syntax, as llguidance reads it: no
      look-around or back-references; ``^``/``$`` anchors are implied);
    - ``choice``: the completion is one of these strings;
    - ``grammar``: a context-free grammar in llguidance's Lark syntax, or llama.cpp's GBNF (converted);
    - ``json_object``: any JSON object (OpenAI's ``{"type": "json_object"}``);
    - ``whitespace_pattern`` (JSON only): a regex for the whitespace allowed between JSON tokens;
      ``disable_any_whitespace``: none at all (``","`` and ``":"``). Default: ``json.dumps``' layout;
    - ``disable_additional_properties`` (JSON only): an object schema that does not say
      ``additionalProperties`` allows no properties beyond those it lists (vLLM's meaning);
    - ``disable_fallback``: accepted for vLLM's clients; there is one engine, so never a fallback.

    Raises ``ValueError`` naming the field (``structured_outputs.regex: ...``) for a wrong type, an invalid
    schema, regex or grammar, or a schema keyword llguidance cannot enforce; ``ImportError`` naming the
    ``structured`` extra when llguidance is not installed.
    """

    json: dict[str, Any] | str | bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    disable_fallback: bool = False
    _grammar: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs must give exactly one of {', '.join(KINDS)}, got "
                             f"{', '.join(given) if given else 'none'}")
        if isinstance(self.json, str):
            from ..readers import ReadError, parse_json

            try:  # the bounded parser: a schema nested thousands deep is a ValueError, not a RecursionError
                self.json = parse_json(self.json, "structured_outputs.json")
            except ReadError as exc:
                raise ValueError(str(exc).replace("; not a file gpt2lab reads", "")) from None
        if self.json is not None and not (self.json is True or isinstance(self.json, dict)):
            raise ValueError(f"structured_outputs.json must be a JSON Schema object (or true for any JSON object), "
                             f"got {type(self.json).__name__}")
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r}")
            self.choice = list(self.choice)
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured_outputs.json_object must be true or false, got {self.json_object!r}")
        for name in ("disable_any_whitespace", "disable_additional_properties", "disable_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured_outputs.{name} must be true or false, got {getattr(self, name)!r}")
        json_only = [name for name in ("whitespace_pattern", "disable_any_whitespace", "disable_additional_properties")
                     if getattr(self, name) not in (None, False)]
        if json_only and self.kind not in ("json", "json_object"):
            raise ValueError(f"structured_outputs.{json_only[0]} applies to json and json_object only, "
                             f"not {self.kind}")

    @classmethod
    def from_dict(cls, value: Any, where: str = "structured_outputs") -> StructuredOutputsParams:
        """From a mapping with these field names (an API body); unknown keys raise ``ValueError`` naming them."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be an object with one of {', '.join(KINDS)}, got {type(value).__name__}")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**value)

    @property
    def kind(self) -> str:
        """Which constraint this is: ``json``, ``regex``, ``choice``, ``grammar`` or ``json_object``."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> str:
        """The spec as canonical text: equal specs (a schema's keys in any order) share a compiled grammar."""
        value = getattr(self, self.kind)
        return json.dumps([self.kind, value, self.whitespace_pattern, self.disable_any_whitespace,
                           self.disable_additional_properties], sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (vLLM's names)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.init and getattr(self, f.name) not in (None, False)}

    def validate(self) -> str:
        """llguidance's grammar for this spec, checked (once per instance): ``ValueError`` naming the field."""
        if self._grammar is None:
            self._grammar = _checked_grammar(self)
        return self._grammar


# -- grammar text --------------------------------------------------------------------------------
_GRAMMARS: OrderedDict[str, str | ValueError] = OrderedDict()  # spec key -> grammar, or why it is invalid
_LOCK = threading.Lock()


def _json_options(spec: StructuredOutputsParams) -> dict[str, Any]:
    # lenient=False: a schema keyword llguidance cannot enforce is an error, never silently dropped
    if spec.whitespace_pattern is not None:
        return {"whitespace_flexible": True, "whitespace_pattern": spec.whitespace_pattern, "lenient": False}
    item, key = COMPACT_SEPARATORS if spec.disable_any_whitespace else DEFAULT_SEPARATORS
    return {"whitespace_flexible": False, "item_separator": item, "key_separator": key, "lenient": False}


# JSON Schema keywords whose value is a subschema, a list of them, or a map from names to them
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
              "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _closed_objects(schema: Any) -> Any:
    """A copy of ``schema`` in which every object schema that does not say ``additionalProperties`` says
    ``false`` (``disable_additional_properties``, vLLM's meaning). Only subschemas are visited: the values of
    ``const``, ``enum`` and ``default`` are data and stay as they are."""
    if isinstance(schema, list):  # items as a list (draft 4)
        return [_closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = _closed_objects(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed_objects(item) for item in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed_objects(item) for name, item in out[key].items()}
    kind = out.get("type")
    if (kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in out) \
            and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _grammar_text(spec: StructuredOutputsParams) -> str:
    llg = llguidance()
    kind = spec.kind
    try:
        if kind in ("json", "json_object"):
            schema = spec.json if isinstance(spec.json, dict) else {"type": "object"}
            if spec.disable_additional_properties:
                schema = _closed_objects(schema)
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=_json_options(spec))
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":  # JSON string literals are Lark string literals
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
        return llg.grammar_from("grammar", spec.grammar)  # Lark, or GBNF converted to Lark
    except ValueError as exc:
        raise ValueError(f"structured_outputs.{kind}: {one_line(str(exc))}") from None


def _checked_grammar(spec: StructuredOutputsParams) -> str:
    key = spec.key
    with _LOCK:
        known = _GRAMMARS.get(key)
        if known is not None:
            _GRAMMARS.move_to_end(key)
    if known is None:
        try:
            grammar = _grammar_text(spec)
            failed, messages = llguidance().LLMatcher.validate_grammar_with_warnings(grammar, None,
                                                                                  limits=parser_limits())
            known = ValueError(f"structured_outputs.{spec.kind}: {one_line(messages[0])}") if failed else grammar
        except ValueError as exc:
            known = exc
        with _LOCK:
            _GRAMMARS[key] = known
            while len(_GRAMMARS) > 4 * _MAX_CACHED:
                _GRAMMARS.popitem(last=False)
    if isinstance(known, ValueError):
        raise ValueError(str(known))
    return known


# -- compiled for a tokenizer ----------------------------------------------------------------------
class _TokenizerGrammars:
    """A tokenizer's llguidance tokenizer (built once: about a second for GPT-2's vocabulary) and its
    compiled grammars (pristine matchers, copied per sequence), least recently used dropped first."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        llg = llguidance()
        eos = tokenizer.eos_token_id
        self.lltokenizer = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size,
                                           **({"eos_token": eos} if eos is not None else {}))
        self.matchers: OrderedDict[str, Any] = OrderedDict()


_BY_TOKENIZER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_grammars(tokenizer: Tokenizer) -> _TokenizerGrammars:
    """``tokenizer``'s llguidance tokenizer and compiled grammars, built on first use (about a second for
    GPT-2's vocabulary) and kept while the tokenizer lives."""
    with _LOCK:
        cached = _BY_TOKENIZER.get(tokenizer)
    if cached is None:
        built = _TokenizerGrammars(tokenizer)  # outside the lock: it takes a while
        with _LOCK:
            cached = _BY_TOKENIZER.setdefault(tokenizer, built)
    return cached


def compiled_matcher(spec: StructuredOutputsParams, tokenizer: Tokenizer) -> Any:
    """A pristine llguidance ``LLMatcher`` of ``spec`` for ``tokenizer`` (cached by the spec's text: copy it
    with ``deep_copy()``, never advance it). Its first token mask is computed here, so the lexer work a
    grammar needs up front is done by the caller (the server: off its event loop). ``ValueError`` naming
    the field when the grammar cannot be compiled or exceeds llguidance's limits."""
    grammar = spec.validate()
    cache = tokenizer_grammars(tokenizer)
    key = spec.key
    with _LOCK:
        matcher = cache.matchers.get(key)
        if matcher is not None:
            cache.matchers.move_to_end(key)
            return matcher
    llg = llguidance()
    matcher = llg.LLMatcher(cache.lltokenizer, grammar, log_level=0, limits=parser_limits())
    if not matcher.is_error():
        matcher.deep_copy().compute_bitmask()
    if matcher.is_error():
        raise ValueError(f"structured_outputs.{spec.kind}: {one_line(matcher.get_error())}")
    with _LOCK:
        cache.matchers[key] = matcher
        while len(cache.matchers) > _MAX_CACHED:
            cache.matchers.popitem(last=False)
    return matcher
