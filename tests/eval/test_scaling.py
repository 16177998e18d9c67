"""lite scaling: latency vs length per architecture; the decoder state it reports equals a count by hand (softmax
attention's grows with the length, linear attention's does not), lengths past a fixed maximum are left out, an
architecture with no length it takes and unknown names are refused."""
import pytest

from eval.scaling import BEAM, ScalingError, markdown, measure
from lite.cli import main


@pytest.fixture(scope="module")
def points():
    return measure("transformer_d128", [4, 8, 300], repeat=1) + measure("linear_100m", [4, 8], repeat=1)


def test_state_sizes_equal_a_hand_count(points):
    state = {(p.arch, p.length): p.state_bytes for p in points}
    for length in (4, 8):  # 6 layers x (keys, values) x beam x 128 channels x L frames x 4 bytes
        assert state["transformer_d128", length] == 6 * 2 * BEAM * 128 * length * 4
        # 6 layers x beam x 4 heads x (S: 34 x 34, z: 34) x 4 bytes, whatever the length
        assert state["linear_100m", length] == 6 * BEAM * 4 * (34 * 34 + 34) * 4
    assert all(p.encoder_ms > 0 and p.step_ms > 0 for p in points)
    table = markdown(points, threads=1)
    assert "| `linear_100m` |" in table and "L = 8" in table


def test_lengths_past_a_fixed_maximum_are_left_out_of_that_row_only(points):
    capped = measure("synthesizer_dense_100m", [8, 300], repeat=1)  # --synthesizer-max-len 256
    assert [p.length for p in capped] == [8]
    rows = {line.split(" | ")[0]: line for line in markdown(points + capped, threads=1).splitlines()}
    assert rows["| `synthesizer_dense_100m`"].endswith(" | – |")
    assert "–" not in rows["| `transformer_d128`"]


def test_bad_lengths_and_names_are_refused(capsys):
    with pytest.raises(ScalingError, match="takes at most"):
        measure("transformer_d128", [5000])
    with pytest.raises(ScalingError, match="synthesizer_dense_100m takes at most 254 tokens"):
        measure("synthesizer_dense_100m", [300])  # --synthesizer-max-len 256
    assert main(["scaling", "--arch", "no_such_arch"]) == 2
    assert "not a registered architecture" in capsys.readouterr().err
