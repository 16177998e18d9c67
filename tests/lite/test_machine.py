"""The CPU a figure was measured on, read from /proc/cpuinfo."""
from lite.machine import describe

X86 = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma
processor\t: 1
model name\t: another core's name
flags\t\t: fpu avx512f avx512_vnni
"""
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp\nCPU part\t: 0xd0b\n"


def test_the_first_cores_model_and_its_most_capable_extension():
    assert {k: describe(X86)[k] for k in ("cpu", "isa")} == {"cpu": "AMD EPYC 7B13", "isa": "avx2"}
    assert describe(X86.replace("avx2", "avx2 avx512f avx512_vnni"))["isa"] == "avx512_vnni"
    assert describe(ARM)["isa"] == "asimddp"


def test_a_cpu_that_names_nothing_still_describes_the_machine():
    machine = describe("")
    assert machine["isa"] == "" and machine["cpu"] and machine["cores"] >= 1 and machine["python"]

