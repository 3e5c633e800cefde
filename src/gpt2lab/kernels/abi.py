"""The C interface of ``kernels.c``, written once: every exported function (its return type and each
argument's name and C type, in order), each structure passed across (each field's name and C type), and
the enum values Python passes as plain numbers. ctypes' ``argtypes``/``restype`` (:func:`bind`) and the
``Structure`` classes (:class:`Matrix`, :class:`Layer`, :class:`LoRAPair`, :class:`LoRATable`) are built
from these tables, never written by hand.

:func:`differences` parses ``kernels.c`` and lists every way it departs from the tables: a function
exported by C but missing here (or the reverse), another return type, an argument added, dropped,
renamed, retyped or moved, a structure field likewise, an enum value changed. ``tests/test_kernels.py``
asserts there are none, and :func:`gpt2lab.kernels.build.build` refuses to compile a source that
disagrees (the library would be called with a signature it does not have: memory corruption, not an
error).

Why a table checked against the C source, rather than a header generated from the table and included
by ``kernels.c``: the C file stays plain C that compiles and reads on its own (no generated include, no
build step that writes source), and the check compares everything the header would have declared, names
included, which a compiler's "conflicting types" check does not (it ignores argument names, and two
swapped ``int64_t`` arguments would still compile).
"""

from __future__ import annotations

import ctypes
import re
from typing import Any

# -- the tables: C types are written as C writes them, tokens separated by single spaces ("const float *")
STRUCTS: dict[str, list[tuple[str, str]]] = {
    # a weight [n_out, n_in] of one kind (KIND_*), int8's fp32 scale per output row (int4's per group of
    # Q4_GROUP inputs of a row), an optional bias
    "gpt2lab_matrix": [("w", "const void *"), ("scale", "const float *"), ("bias", "const float *"),
                       ("kind", "int64_t")],
    # one block's weights and its KV cache
    "gpt2lab_layer": [("ln_1_w", "const float *"), ("ln_1_b", "const float *"), ("attn", "gpt2lab_matrix"),
                      ("attn_proj", "gpt2lab_matrix"), ("ln_2_w", "const float *"), ("ln_2_b", "const float *"),
                      ("fc", "gpt2lab_matrix"), ("mlp_proj", "gpt2lab_matrix"), ("k_cache", "float *"),
                      ("v_cache", "float *"), ("attn_scale", "float")],
    # one LoRA adapter's pair for one projection (a NULL: not adapted): A [rank, in], B^T [rank, out], fp32
    "gpt2lab_lora_pair": [("a", "const float *"), ("bt", "const float *"), ("rank", "int64_t"), ("scale", "float")],
    # the adapters of a forward: each token's slot (-1: none), the [slot][layer][4] pairs, scratch
    "gpt2lab_lora": [("token_slot", "const int64_t *"), ("pairs", "const gpt2lab_lora_pair *"), ("tmp", "float *"),
                     ("max_rank", "int64_t")],
}

FUNCTIONS: dict[str, tuple[str, list[tuple[str, str]]]] = {  # name: (return type, [(argument, C type)])
    "gpt2lab_has_avx2": ("int", []),
    "gpt2lab_isa": ("int", []),
    "gpt2lab_linear": ("void", [
        ("x", "const float *"), ("W_in", "const gpt2lab_matrix *"), ("y", "float *"), ("n_rows", "int64_t"),
        ("n_out", "int64_t"), ("n_in", "int64_t"), ("xq_scratch", "int16_t *"), ("xs_scratch", "float *"),
        ("n_threads", "int")]),
    "gpt2lab_forward": ("int", [
        ("layers", "const gpt2lab_layer *"), ("n_layer", "int64_t"), ("wte", "const gpt2lab_matrix *"),
        ("wpe", "const float *"), ("ln_f_w", "const float *"), ("ln_f_b", "const float *"),
        ("head", "const gpt2lab_matrix *"), ("tokens", "const int64_t *"), ("positions", "const int64_t *"),
        ("cache_rows", "const int64_t *"), ("n_tok", "int64_t"), ("logit_tokens", "const int64_t *"),
        ("n_logits", "int64_t"), ("n_embd", "int64_t"), ("n_head", "int64_t"), ("n_inner", "int64_t"),
        ("vocab", "int64_t"), ("max_seq", "int64_t"), ("eps", "float"), ("activation", "int64_t"),
        ("x", "float *"), ("h", "float *"), ("big", "float *"), ("hl", "float *"), ("scores_all", "float *"),
        ("xq_scratch", "int16_t *"), ("xs_scratch", "float *"), ("logits", "float *"), ("n_threads", "int"),
        ("lora", "const gpt2lab_lora *")]),
    "gpt2lab_top_k_": ("int", [
        ("scores", "float *"), ("rows", "int64_t"), ("vocab", "int64_t"), ("ks", "const int64_t *"),
        ("heap", "float *"), ("thresholds", "float *")]),
    "gpt2lab_row_totals": ("void", [
        ("probs", "const float *"), ("rows", "int64_t"), ("vocab", "int64_t"), ("totals", "double *")]),
    "gpt2lab_inverse_cdf": ("void", [
        ("probs", "const float *"), ("rows", "int64_t"), ("vocab", "int64_t"), ("targets", "const double *"),
        ("picked", "int64_t *")]),
}

# enum values that cross as plain numbers: gpt2lab_matrix.kind, int4's group size, gpt2lab_forward's activation
CONSTANTS: dict[str, int] = {
    "KIND_F32": 0, "KIND_Q8": 1, "KIND_BF16": 2, "KIND_Q4": 3, "Q4_GROUP": 128, "ISA_PORTABLE": 0, "ISA_AVX2": 1,
    "ISA_AVX512": 2,
    "EPILOGUE_GELU_TANH": 2, "EPILOGUE_GELU": 3, "EPILOGUE_RELU": 4, "EPILOGUE_SILU": 5,
}

_SCALARS = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float, "double": ctypes.c_double}


class Matrix(ctypes.Structure):
    """``gpt2lab_matrix`` (fields from :data:`STRUCTS`)."""


class Layer(ctypes.Structure):
    """``gpt2lab_layer`` (fields from :data:`STRUCTS`)."""


class LoRAPair(ctypes.Structure):
    """``gpt2lab_lora_pair`` (fields from :data:`STRUCTS`)."""


class LoRATable(ctypes.Structure):
    """``gpt2lab_lora`` (fields from :data:`STRUCTS`)."""


_STRUCT_TYPES: dict[str, type[ctypes.Structure]] = {"gpt2lab_matrix": Matrix, "gpt2lab_layer": Layer,
                                                    "gpt2lab_lora_pair": LoRAPair, "gpt2lab_lora": LoRATable}


def ctype(c_type: str) -> Any:
    """The ctypes type for C type ``c_type`` as the tables write it: a scalar's own, ``POINTER(Structure)``
    for a pointer to a structure above, ``c_void_p`` for every other pointer (arguments are ``data_ptr()``
    integers or ctypes arrays), the Structure for a structure by value, None for ``void``. KeyError for a
    type the tables do not use."""
    tokens = [t for t in c_type.split() if t != "const"]
    if tokens == ["void"]:
        return None
    if tokens[-1] == "*":
        pointee = _STRUCT_TYPES.get(" ".join(tokens[:-1]))
        return ctypes.c_void_p if pointee is None else ctypes.POINTER(pointee)
    name = " ".join(tokens)
    return _STRUCT_TYPES[name] if name in _STRUCT_TYPES else _SCALARS[name]


Matrix._fields_ = [(name, ctype(t)) for name, t in STRUCTS["gpt2lab_matrix"]]
Layer._fields_ = [(name, ctype(t)) for name, t in STRUCTS["gpt2lab_layer"]]
LoRAPair._fields_ = [(name, ctype(t)) for name, t in STRUCTS["gpt2lab_lora_pair"]]
LoRATable._fields_ = [(name, ctype(t)) for name, t in STRUCTS["gpt2lab_lora"]]


def bind(library: ctypes.CDLL) -> ctypes.CDLL:
    """Set ``argtypes`` and ``restype`` of every function in :data:`FUNCTIONS` on ``library``; returns it."""
    for name, (returns, arguments) in FUNCTIONS.items():
        function = getattr(library, name)
        function.argtypes = [ctype(t) for _, t in arguments]
        function.restype = ctype(returns)
    return library


# -- reading kernels.c ----------------------------------------------------------------------------------
_COMMENTS = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_PREPROCESSOR = re.compile(r"^[ \t]*#[^\n]*", re.M)
# a definition at the start of a line, not static: the exported functions (no argument list here holds parentheses)
_FUNCTION = re.compile(r"^(?!static\b|typedef\b|enum\b|struct\b)(?P<head>[A-Za-z_][\w \t*]*)"
                       r"\((?P<arguments>[^()]*)\)\s*\{", re.M)
_STRUCT = re.compile(r"\btypedef\s+struct\s*\w*\s*\{(?P<body>[^{}]*)\}\s*(?P<name>\w+)\s*;")
_ENUM = re.compile(r"\benum\s*\w*\s*\{(?P<body>[^{}]*)\}")


def _declaration(text: str) -> tuple[str, str]:
    """``(name, C type)`` of one declaration (``const float *x``: ``("x", "const float *")``; ``float f[8]``:
    ``("f", "float [8]")``)."""
    tokens = re.findall(r"\w+|\*|\[\w*\]", text)
    if tokens[-1].startswith("["):
        return tokens[-2], " ".join(tokens[:-2] + tokens[-1:])
    return tokens[-1], " ".join(tokens[:-1])


def parse(source: str) -> tuple[dict[str, tuple[str, list[tuple[str, str]]]], dict[str, list[tuple[str, str]]],
                                 dict[str, int]]:
    """``(functions, structs, constants)`` declared in C ``source``, in the tables' shapes: every function
    defined at the start of a line that is not ``static``, every ``typedef struct``, every enum value."""
    code = _PREPROCESSOR.sub("", _COMMENTS.sub(" ", source))
    functions = {}
    for m in _FUNCTION.finditer(code):
        arguments = m["arguments"].strip()
        parsed = [] if arguments in ("", "void") else [_declaration(a) for a in arguments.split(",")]
        name, returns = _declaration(m["head"])
        functions[name] = (returns, parsed)
    structs = {}
    for m in _STRUCT.finditer(code):
        fields = []
        for statement in filter(str.strip, m["body"].split(";")):
            first, *more = statement.split(",")
            name, c_type = _declaration(first)
            base = c_type.rstrip(" *")  # "const float *a, *b": the base type, each declarator its own stars
            fields.append((name, c_type))
            for declarator in more:
                name, stars = _declaration(declarator)
                fields.append((name, f"{base} {stars}".strip()))
        structs[m["name"]] = fields
    constants = {}
    for m in _ENUM.finditer(code):
        value = -1
        for item in filter(str.strip, m["body"].split(",")):
            name, _, explicit = item.partition("=")
            value = int(explicit, 0) if explicit.strip() else value + 1
            constants[name.strip()] = value
    return functions, structs, constants


def differences(source: str) -> list[str]:
    """Every way C ``source`` (``kernels.c``'s text) departs from :data:`FUNCTIONS`, :data:`STRUCTS` and
    :data:`CONSTANTS`, one sentence each; empty when they agree exactly."""
    functions, structs, constants = parse(source)
    out = [f"kernels.c exports {name}, which kernels/abi.py does not declare" for name in functions
           if name not in FUNCTIONS]
    for name, (returns, arguments) in FUNCTIONS.items():
        if name not in functions:
            out.append(f"kernels/abi.py declares {name}, which kernels.c does not export")
            continue
        c_returns, c_arguments = functions[name]
        if c_returns != returns:
            out.append(f"{name} returns {c_returns} in kernels.c, {returns} in kernels/abi.py")
        if c_arguments != arguments:
            out.append(f"{name}'s arguments differ: kernels.c {c_arguments}, kernels/abi.py {arguments}")
    for name, fields in STRUCTS.items():
        if structs.get(name) != fields:
            out.append(f"struct {name} differs: kernels.c {structs.get(name)}, kernels/abi.py {fields}")
    for name, value in CONSTANTS.items():
        if constants.get(name) != value:
            out.append(f"{name} is {constants.get(name)} in kernels.c, {value} in kernels/abi.py")
    return out
