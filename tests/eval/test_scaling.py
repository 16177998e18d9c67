"""lite scaling: latency vs length per architecture; the decoder state it reports equals a count by hand (softmax
attention's grows with the length, linear attention's does not), lengths past a fixed maximum are left out, an
architecture with no length it takes and unknown names are refused; --train times a training step on a batch of a
fixed number of tokens."""
import json

import pytest

from eval.scaling import BEAM, ScalingError, markdown, measure, measure_training, training_markdown
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


def test_training_steps_are_timed_on_batches_of_a_fixed_number_of_tokens():
    points = measure_training("synthesizer_dense_100m", [4, 40, 300], tokens=80, repeat=1)  # 300 > its 254
    assert [(p.length, p.sentences) for p in points] == [(4, 20), (40, 2)]
    assert all(p.step_s > 0 for p in points)
    table = training_markdown(points, threads=1)
    assert "L = 40 (2 sentences)" in table and "| `synthesizer_dense_100m` |" in table


def test_train_flag_prints_the_training_table(capsys):
    assert main(["scaling", "--arch", "transformer_d128", "--lengths", "6", "--train", "--tokens", "12",
                 "--repeat", "1", "--json"]) == 0
    [point] = json.loads(capsys.readouterr().out)
    assert (point["arch"], point["length"], point["sentences"]) == ("transformer_d128", 6, 2) and point["step_s"] > 0
