import numpy as np
import pytest

from enformer_vep.errors import InputError
from enformer_vep.targets import Targets, packaged_targets, read_targets, select_tracks


def test_packaged_tables_have_the_released_track_counts():
    human, mouse = packaged_targets("human"), packaged_targets("mouse")
    assert (len(human), len(mouse)) == (5313, 1643)
    assert human.ids[0] == "ENCFF833POA" and human.labels[0].startswith("DNASE:")
    assert human.labels[4675].startswith("CAGE:") and human.labels[4674].startswith("CHIP:")


TOY = Targets(["a", "b", "c", "d", "e"], ["DNASE:liver", "CAGE:brain", "CAGE:liver", "CHIP:CTCF", "ATAC:x"])


def test_indices_and_ranges():
    np.testing.assert_array_equal(select_tracks("0-1, 4", TOY), [0, 1, 4])
    np.testing.assert_array_equal(select_tracks("3,1", TOY), [1, 3])
    np.testing.assert_array_equal(select_tracks(None, TOY), [0, 1, 2, 3, 4])
    with pytest.raises(InputError, match="numbered 0..4"):
        select_tracks("2-5", TOY)


def test_regular_expression_on_descriptions():
    np.testing.assert_array_equal(select_tracks("^CAGE:", TOY), [1, 2])
    np.testing.assert_array_equal(select_tracks("liver", TOY), [0, 2])
    assert TOY.subset(np.array([2])).ids == ["c"]
    with pytest.raises(InputError, match="matches no track"):
        select_tracks("^RNA:", TOY)
    with pytest.raises(InputError, match="regular expression"):
        select_tracks("CAGE(", TOY)


def test_custom_table(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("index\tgenome\tidentifier\tfile\tclip\tscale\tsum_stat\tdescription\n0\t0\tX1\tf\t1\t1\tsum\tCAGE:x\n")
    assert read_targets(path) == Targets(["X1"], ["CAGE:x"])
    path.write_text("a\tb\n1\t2\n")
    with pytest.raises(InputError, match="identifier"):
        read_targets(path)
