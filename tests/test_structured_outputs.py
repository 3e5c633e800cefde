"""Structured outputs in the library: JSON Schema, regex, choice and grammar constraints on a random model and the
bundled one; the constrained distribution checked by exact enumeration; mixed batches; errors before any work."""

from __future__ import annotations

import json
import re

import pytest
import torch

from gpt2lab.sampling import SamplingParams, StructuredOutputsParams

from .conftest import tiny_model

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

S = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": S}, "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"],
     "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -50, "maximum": 50}}, "required": ["n"],
     "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["x"],
     "additionalProperties": False},
    {"type": "object", "properties": {"t": {"type": "number", "exclusiveMinimum": -1, "exclusiveMaximum": 1,
                                            "multipleOf": 0.25}},
     "required": ["t"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"c": {"enum": ["red", "green", "blue"]}}, "required": ["c"],
     "additionalProperties": False},
    {"type": "object", "properties": {"k": {"const": "fixed"}, "v": {"type": "integer", "minimum": 1, "maximum": 3}},
     "required": ["k", "v"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                       "maximum": 99}, "minItems": 2, "maxItems": 4}},
     "required": ["xs"], "additionalProperties": False},
    {"type": "object", "properties": {"empty": {"type": "array", "items": S, "maxItems": 0}}, "required": ["empty"],
     "additionalProperties": False},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {"a": S, "b": {"type": "boolean"}},
                                                "required": ["a", "b"], "additionalProperties": False}},
     "required": ["inner"], "additionalProperties": False},
    {"type": "object", "properties": {"l1": {"type": "object", "properties": {"l2": {
        "type": "object", "properties": {"l3": {"type": "integer", "minimum": 0, "maximum": 5}}, "required": ["l3"],
        "additionalProperties": False}}, "required": ["l2"], "additionalProperties": False}},
     "required": ["l1"], "additionalProperties": False},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                      {"type": "boolean"}]}}, "required": ["v"],
     "additionalProperties": False},
    {"type": "object", "properties": {"v": {"anyOf": [S, {"type": "null"}]}}, "required": ["v"],
     "additionalProperties": False},
    {"anyOf": [{"type": "object", "properties": {"cat": S}, "required": ["cat"], "additionalProperties": False},
               {"type": "object", "properties": {"dog": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["dog"], "additionalProperties": False}]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["code"],
     "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
     "required": ["date"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^(ab|cd)[0-9]$"}}, "required": ["id"],
     "additionalProperties": False},
    {"type": "object", "properties": {"s": {"type": "string", "minLength": 3, "maxLength": 5}}, "required": ["s"],
     "additionalProperties": False},
    {"type": "object", "properties": {"req": S, "opt": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["req"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}, "c": {"type": "boolean"}},
     "additionalProperties": False},
    {"type": "object", "properties": {"p": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}},
                                            "required": ["x"], "additionalProperties": False},
                                      "q": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
     "required": ["p", "q"], "additionalProperties": False},
    {"type": "object", "properties": {"people": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}}}, "required": ["people"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3},
    {"type": "array", "prefixItems": [{"type": "boolean"}, {"enum": ["x", "y"]}], "items": False, "minItems": 2},
    {"type": "string", "enum": ["alpha", "beta", "gamma"]},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                                      "score": {"type": "integer", "minimum": 1, "maximum": 5}},
     "required": ["label", "score"], "additionalProperties": False},
    {"type": "object", "properties": {"m": {"type": "array", "items": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2}, "minItems": 1, "maxItems": 2}},
     "required": ["m"], "additionalProperties": False},
]
PROMPTS = ["Here is the JSON:", "ROMEO:", "{", "The answer is"]


def run_all(gen, requests: list[tuple[str, SamplingParams]], max_batch: int = 32):
    """Every (prompt, params) request in one continuous batch; each request's completions."""
    runner = gen.runner(max_batch=max_batch)
    ids = [runner.add(gen.encode_prompt(prompt), params) for prompt, params in requests]
    runner.run()
    return [runner.completions(i) for i in ids]


@pytest.fixture(scope="module")
def bundled():
    import gpt2lab

    return gpt2lab.load("shakespeare-gpt2")


def test_thirty_schemas(gen):
    assert len(SCHEMAS) == 30 and len({json.dumps(s, sort_keys=True) for s in SCHEMAS}) == 30
    for schema in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["random", "bundled"])
def test_every_output_of_30_schemas_validates_greedy_and_sampled(gen, bundled, model, one_thread):
    generator = gen if model == "random" else bundled
    requests = []
    for k, schema in enumerate(SCHEMAS):
        spec = {"json": schema}
        requests.append((PROMPTS[k % 4], SamplingParams(max_new_tokens=96, temperature=0, structured_outputs=spec)))
        requests.append((PROMPTS[k % 4], SamplingParams(max_new_tokens=96, temperature=1.0, seed=k, n=2,
                                                        structured_outputs=spec)))
    for (_, params), completions in zip(requests, run_all(generator, requests)):
        schema = params.structured_outputs.json
        for c in completions:
            assert c.finish_reason == "stop", (schema, c.text)
            jsonschema.validate(json.loads(c.text), schema)


REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)",
           r"(0|[1-9][0-9]{0,2})(\.[0-9]{1,2})?",
           r"[A-Z][a-z]{2,6}( [A-Z][a-z]{2,6})?", r"\((a|b){1,6}\)", r"(ab){1,3}c?"]


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_regex_outputs_fullmatch(gen, temperature):
    # bounded repetitions: a random model may never choose to end an unbounded one (that ends at "length")
    requests = [("Write:", SamplingParams(max_new_tokens=40, temperature=temperature, seed=7, n=3,
                                          structured_outputs={"regex": r})) for r in REGEXES]
    for regex, completions in zip(REGEXES, run_all(gen, requests)):
        for c in completions:
            assert re.fullmatch(regex, c.text), (regex, c.text, c.finish_reason)


def test_grammar_in_lark_and_gbnf(gen):
    lark = 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[a-z]{2,5}/'
    gbnf = 'root ::= ("yes" | "no") " " [0-9] [0-9]?'
    for grammar, pattern in ((lark, r"(hello|hi) [a-z]{2,5}"), (gbnf, r"(yes|no) [0-9][0-9]?")):
        for c in gen.generate(["A:", "B:"], max_new_tokens=20, temperature=1.0, seed=3, n=2,
                              structured_outputs={"grammar": grammar}):
            assert re.fullmatch(pattern, c.text) and c.finish_reason == "stop", (grammar, c.text)


def test_json_object_any_and_whitespace_options(gen):
    out = gen.generate("JSON:", max_new_tokens=60, temperature=0, structured_outputs={"json": True})[0]
    assert out.text.startswith("{")
    compact = {"json": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                                         "b": {"type": "boolean"}}, "required": ["a", "b"],
                        "additionalProperties": False}, "disable_any_whitespace": True}
    text = gen.generate("JSON:", max_new_tokens=30, temperature=0, structured_outputs=compact)[0].text
    assert " " not in text and json.loads(text).keys() == {"a", "b"}
    spaced = gen.generate("JSON:", max_new_tokens=30, temperature=0,
                          structured_outputs={**compact, "disable_any_whitespace": False})[0].text
    assert ", " in spaced and '": ' in spaced  # json.dumps' layout by default


def test_length_limit_leaves_a_valid_prefix(gen):
    out = gen.generate("x", max_new_tokens=3, temperature=1.0, seed=1, structured_outputs={"regex": "[a-z]{40}"})[0]
    assert out.finish_reason == "length" and re.fullmatch("[a-z]*", out.text) and 0 < len(out.text) < 40


def _enumerate_choice_probs(gen, prompt_ids: list[int], choices: list[str]) -> dict[str, float]:
    """The exact probability the constrained sampler gives each choice: over every token path that spells it, the
    product of the model's next-token distributions renormalised over the tokens that keep a choice reachable
    (no choice is a prefix of another, so a path ends as its text completes one)."""
    tok = gen.tokenizer
    targets = [c.encode() for c in choices]
    vocab = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    probs = dict.fromkeys(choices, 0.0)

    def walk(path: list[int], done: bytes, p: float) -> None:
        allowed = [t for t, b in enumerate(vocab) if b and any(c.startswith(done + b) for c in targets)]
        logits = gen.logits(prompt_ids + path)[-1].double()
        weights = torch.softmax(logits[allowed], dim=-1).tolist()
        for t, w in zip(allowed, weights):
            text = done + vocab[t]
            if text in targets:
                probs[text.decode()] += p * w
            else:
                walk(path + [t], text, p * w)

    walk([], b"", 1.0)
    return probs


@pytest.mark.slow
def test_choice_frequencies_match_the_renormalised_model_probabilities(tmp_path_factory, one_thread):
    # large initial weights: a peaked distribution, so that a wrong mask or renormalisation shows
    _, peaked = tiny_model(tmp_path_factory, "choice", seed=5, initializer_range=0.4)
    choices = ["yes", "no", "maybe", "perhaps"]
    prompt = "Will it rain?"
    expected = _enumerate_choice_probs(peaked, peaked.encode_prompt(prompt), choices)
    assert abs(sum(expected.values()) - 1) < 1e-9 and max(expected.values()) < 0.9
    requests = [(prompt, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1000 + k, n=128,
                                        structured_outputs={"choice": choices})) for k in range(16)]
    texts = [c.text for completions in run_all(peaked, requests, max_batch=128) for c in completions]
    total = len(texts)
    for choice in choices:
        p = expected[choice]
        freq = texts.count(choice) / total
        assert abs(freq - p) <= 4 * (p * (1 - p) / total) ** 0.5 + 1e-3, (choice, freq, p, expected)
    assert set(texts) <= set(choices)


def test_mixed_batch_gives_each_row_what_it_gives_alone(gen):
    schema = SCHEMAS[23]
    rows = [
        ("JSON:", SamplingParams(max_new_tokens=40, temperature=0.9, seed=11, structured_outputs={"json": schema})),
        ("Once upon a time", SamplingParams(max_new_tokens=20, temperature=0.9, seed=12)),
        ("Pick:", SamplingParams(max_new_tokens=10, temperature=0, structured_outputs={"choice": ["left", "right"]})),
        ("ROMEO:", SamplingParams(max_new_tokens=20, temperature=0)),
        ("Code:", SamplingParams(max_new_tokens=20, temperature=1.0, seed=13, top_k=20, n=2,
                                 structured_outputs={"regex": "[A-Z]{2}[0-9]{3}"})),
    ]
    together = run_all(gen, rows)
    for row, batched in zip(rows, together):
        alone = run_all(gen, [row])[0]
        assert [(c.token_ids, c.text, c.finish_reason) for c in batched] == \
            [(c.token_ids, c.text, c.finish_reason) for c in alone]


def test_stream_logprobs_and_seeds_with_a_constraint(gen):
    spec = {"json": SCHEMAS[29]}
    full = gen.generate("JSON:", max_new_tokens=60, temperature=0.8, seed=4, logprobs=2, structured_outputs=spec)[0]
    streamed = gen.stream("JSON:", max_new_tokens=60, temperature=0.8, seed=4, structured_outputs=spec)
    assert "".join(streamed) == full.text
    again = gen.generate("JSON:", max_new_tokens=60, temperature=0.8, seed=4, structured_outputs=spec)[0]
    assert again.token_ids == full.token_ids
    # logprobs are the raw model's (as without a constraint): the first token's is log_softmax of the logits
    raw = torch.log_softmax(gen.logits(gen.encode_prompt("JSON:"))[-1].float(), dim=-1)
    assert full.logprobs[0].logprob == pytest.approx(float(raw[full.token_ids[0]]), abs=1e-3)
    assert len(full.logprobs) == len(full.token_ids)


@pytest.mark.parametrize("spec, field", [
    ({"regex": "(abc"}, "structured_outputs.regex"),
    ({"json": {"type": "objekt"}}, "structured_outputs.json"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"json": '{"anyOf":[' * 5000 + "{}" + "]}" * 5000}, "structured_outputs.json: JSON nested deeper"),
    ({"json": {"type": "string", "format": "no-such-format-x"}}, "structured_outputs.json"),
    ({"grammar": "start: undefined_rule"}, "structured_outputs.grammar"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"choice": ["a", 3]}, "structured_outputs.choice"),
    ({"json": True, "regex": "a"}, "exactly one"),
    ({"regex": "a", "disable_any_whitespace": True}, "json_object only"),
    ({"jsn": {}}, "unknown field(s) jsn"),
])
def test_invalid_specs_raise_value_error_naming_the_field_before_any_work(gen, spec, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        SamplingParams(structured_outputs=spec)
    with pytest.raises(ValueError, match=re.escape(field)):
        gen.generate("x", max_new_tokens=2, structured_outputs=spec)


def test_beam_search_with_a_constraint_is_a_value_error(gen):
    with pytest.raises(ValueError, match="beam search"):
        gen.generate("x", num_beams=2, structured_outputs={"choice": ["a", "b"]})


def test_spec_objects_and_caching(gen):
    a = StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "integer"}}})
    b = StructuredOutputsParams(json='{"properties": {"x": {"type": "integer"}}, "type": "object"}')
    assert a.key == b.key and a.kind == "json"  # the same schema, its keys in another order
    params = SamplingParams(structured_outputs=a)
    assert params.with_(temperature=0).structured_outputs is a
    assert params.to_dict()["structured_outputs"] == {"json": a.json}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_transform_masks_exactly_the_forbidden_tokens_in_each_dtype(gen, dtype):
    # a constrained row between two plain ones: its forbidden tokens (and the ids past the tokenizer's
    # vocabulary) are -inf, its allowed ones and the plain rows keep their scores (numpy path on CPU for
    # float32/float16, the torch path for bfloat16, which numpy cannot hold)
    from gpt2lab.sampling import StructuredOutput

    tokenizer = gen.tokenizer
    width = tokenizer.vocab_size + 7
    spec = StructuredOutputsParams(choice=["yes", "no"])
    transform = StructuredOutput([None, spec, None], width, tokenizer)
    scores = torch.randn(3, width, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = scores.clone()
    out = transform.apply_(scores, [[1, 2], [1, 2], [1, 2]], [2, 2, 2])
    allowed = sorted(torch.nonzero(torch.isfinite(out[1])).flatten().tolist())
    firsts = sorted({tokenizer.encode(w)[0] for w in ("yes", "no")})
    assert allowed and set(firsts) <= set(allowed)
    assert all(tokenizer.decode([t]) and ("yes".startswith(tokenizer.decode([t]))
                                         or "no".startswith(tokenizer.decode([t]))) for t in allowed)
    assert torch.equal(out[1, allowed], before[1, allowed])
    assert torch.equal(out[0], before[0]) and torch.equal(out[2], before[2])
    assert bool(torch.isneginf(out[1, tokenizer.vocab_size:]).all())


def test_disable_additional_properties_closes_every_object_schema(gen):
    from gpt2lab.sampling.structured import _closed_objects

    open_schema = {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 9},
        "inner": {"type": "object", "properties": {"b": {"type": "boolean"}}, "required": ["b"]},
        "properties": {"const": {"type": "object", "x": 1}}},  # a property named "properties"; data in const
        "required": ["a", "inner"]}
    closed = _closed_objects(open_schema)
    assert closed["additionalProperties"] is False and closed["properties"]["inner"]["additionalProperties"] is False
    assert closed["properties"]["properties"] == {"const": {"type": "object", "x": 1}}  # data left alone
    assert "additionalProperties" not in open_schema  # a copy
    spec = StructuredOutputsParams(json=open_schema, disable_additional_properties=True, disable_fallback=True)
    assert spec.key != StructuredOutputsParams(json=open_schema).key
    outs = gen.generate("{", max_new_tokens=60, temperature=1.0, seed=3, n=6, structured_outputs=spec)
    for c in outs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), closed)
    with pytest.raises(ValueError, match="structured_outputs.disable_additional_properties"):
        StructuredOutputsParams(regex="a", disable_additional_properties=True)
    # the same extra property: allowed by the open schema's grammar, refused by the closed one's
    from gpt2lab.sampling import GrammarState

    extra = gen.tokenizer.encode('{"a": 1, "inner": {"b": true}, "zzz": 2}')
    GrammarState(StructuredOutputsParams(json=open_schema), gen.tokenizer).advance(extra)
    with pytest.raises(ValueError, match="not allowed"):
        GrammarState(spec, gen.tokenizer).advance(extra)
