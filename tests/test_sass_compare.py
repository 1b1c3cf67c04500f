"""scripts/sass_compare.py's parsing and verdicts, on cuobjdump output written out by hand (the
script itself compiles the CUDA sources twice, minutes on two cores, so it is not run here)."""
import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "sass_compare", os.path.join(HERE, "..", "scripts", "sass_compare.py"))
sc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sc)

HEADER = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit

	code for sm_90
	.target	sm_90
"""


def kernel(name, body):
    lines = [f"\t\tFunction : {name}", '\t.headerflags\t@"EF_CUDA_SM90"']
    for i, (ins, enc) in enumerate(body):
        lines.append(f"        /*{16 * i:04x}*/                   {ins} ;   /* 0x{enc:016x} */")
        lines.append(f"                                             /* 0x000fe200078e00{i:02x} */")
    lines.append("\t\t..........")
    return "\n".join(lines) + "\n"


def res(name, reg, stack):
    return (f" Function {name}:\n  REG:{reg} STACK:{stack} SHARED:0 LOCAL:0 CONSTANT[0]:720 "
            "TEXTURE:0 SURFACE:0 SAMPLER:0\n")


BODY = [("LDG.E.CONSTANT R2, desc[UR4][R4.64]", 1), ("FFMA R3, R2, R5, R6", 2),
        ("@!P0 FADD R3, R3, -R7", 3), ("NOP", 4), ("HFMA2.MMA R8, -RZ, RZ, 0, 0", 5),
        ("STG.E desc[UR4][R10.64], R3", 6), ("EXIT", 7)]


def test_parse_sass_and_resources():
    text = HEADER + kernel("k_a", BODY) + kernel("k_b", BODY[:2])
    sass = sc.parse_sass(text)
    assert list(sass) == ["k_a", "k_b"]
    assert len(sass["k_a"]) == 2 * len(BODY)  # each instruction and its encoding's second word
    assert sass["k_a"][0].startswith("LDG.E.CONSTANT R2, desc[UR4][R4.64] ;")
    ops = sc.opcodes(sass["k_a"])
    # Predicates are dropped; NOP and the register-zeroing HFMA2.MMA are not counted.
    assert ops == {"LDG.E.CONSTANT": 1, "FFMA": 1, "FADD": 1, "STG.E": 1, "EXIT": 1}
    r = sc.parse_resources("\nResource usage:\n Common:\n  GLOBAL:28\n" + res("k_a", 40, 8))
    assert r["k_a"]["REG"] == 40 and r["k_a"]["STACK"] == 8


def verdict(after_body, reg=(40, 40), stack=(0, 0)):
    before = sc.parse_sass(HEADER + kernel("k", BODY))
    after = sc.parse_sass(HEADER + kernel("k", after_body))
    rows, flagged = sc.compare(before, after, sc.parse_resources(res("k", reg[0], stack[0])),
                               sc.parse_resources(res("k", reg[1], stack[1])))
    assert len(rows) == 1
    return rows[0][1], flagged, rows[0][2]


def test_identical_needs_the_same_encodings():
    assert verdict(BODY)[:2] == ("identical", 0)
    # Same instruction text, other control bits in the encoding: not identical.
    moved = [(ins, enc + 0x100) for ins, enc in BODY]
    assert verdict(moved)[:2] == ("scheduling", 0)


def test_reordered_and_renamed_is_scheduling():
    body = [BODY[0], ("@!P0 FADD R9, R9, -R7", 3), ("FFMA R9, R2, R5, R6", 2)] + BODY[3:]
    assert verdict(body, reg=(40, 42))[:2] == ("scheduling", 0)


@pytest.mark.parametrize("case", ["stack", "registers", "fp", "instructions"])
def test_flagged(case):
    body, reg, stack = list(BODY), (40, 40), (0, 0)
    if case == "stack":
        stack = (0, 8)
        body[3] = ("STL [R1], R3", 4)
    elif case == "registers":
        reg = (40, 43)
        body[1] = ("FFMA R42, R2, R5, R6", 2)
    elif case == "fp":
        body[1] = ("FMUL R3, R2, R5", 2)  # one FFMA became an FMUL
    else:
        body = body[:-1] + [("IADD3 R1, R1, 0x1, RZ", 8)] + body[-1:]
    status, flagged, detail = verdict(body, reg, stack)
    assert (status, flagged) == ("FLAGGED", 1), detail
    want = {"stack": "more stack", "registers": "more registers",
            "fp": "floating-point instruction counts", "instructions": "more instructions"}[case]
    assert want in detail


def test_added_and_removed_are_listed_not_flagged():
    before = sc.parse_sass(HEADER + kernel("old", BODY))
    after = sc.parse_sass(HEADER + kernel("new", BODY))
    rows, flagged = sc.compare(before, after, {}, {})
    assert sorted((k, s) for k, s, _ in rows) == [("new", "added"), ("old", "removed")]
    assert flagged == 0
