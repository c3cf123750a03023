import json
import os
import shutil

import numpy as np
import pytest
from bundle_writer import field_bytes, field_varint, object_graph, tree_nodes, write_bundle
from helpers import DATA

from enformer_vep.errors import WeightsError
from enformer_vep.tensor_bundle import TensorBundle

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def _strings(*values):
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _tensors():
    """Tensors of every kind the reader must return bit-exactly; many keys share prefixes."""
    rng = np.random.default_rng(0)
    tensors = {
        "scalar_f32": np.array(1.5, np.float32),
        "weights/big": rng.standard_normal((160, 130)).astype(np.float32),  # 83 kB: many CRC lanes
        "counter": np.array(-(2**40), np.int64),
        "ints": rng.integers(-(2**62), 2**62, (3, 4), dtype=np.int64),
        "flags": np.array([True, False, True]),
        "bf16": rng.integers(0, 2**16, (5, 7), dtype=np.uint16),
        "empty": np.zeros((0, 3), np.float32),
        "strings": _strings(b"", b"abc", bytes(range(256)) * 3),
        "string_scalar": np.array(b"graph bytes \x00\xff", dtype=object),
    }
    for i in range(40):
        tensors[f"layers/{i:03d}/w"] = rng.standard_normal((i % 5 + 1, 3)).astype(np.float32)
    return tensors


def _write_test_bundle(prefix):
    # small blocks and restart intervals: several data blocks, several restarts per block
    return write_bundle(prefix, _tensors(), bfloat16={"bf16"}, block_size=512, restart_interval=4)


@pytest.fixture
def bundle_prefix(tmp_path):
    prefix = tmp_path / "ckpt"
    _write_test_bundle(prefix)
    return prefix


def test_round_trip(bundle_prefix):
    expected = _tensors()
    bundle = TensorBundle(bundle_prefix)
    assert bundle.keys() == sorted(expected)
    for key, value in expected.items():
        got = bundle.read(key)
        assert bundle.shape(key) == value.shape == got.shape, key
        if value.dtype == object:
            assert got.dtype == bundle.dtype(key) == np.dtype(object)
            assert got.tolist() == value.tolist()
        else:
            assert got.dtype == bundle.dtype(key) == value.dtype, key
            assert got.tobytes() == value.tobytes(), key
    assert bundle.tf_dtype("bf16") == "bfloat16"
    assert bundle.tf_dtype("strings") == "string"
    assert bundle.tf_dtype("counter") == "int64"


def test_accepts_index_path(bundle_prefix):
    bundle = TensorBundle(str(bundle_prefix) + ".index")
    assert bundle.read("scalar_f32") == np.float32(1.5)


def test_no_object_graph(bundle_prefix):
    assert TensorBundle(bundle_prefix).object_paths() is None


def _sonnet_bundle(tmp_path, nodes):
    rng = np.random.default_rng(1)
    tensors = {
        f"module/{path}{SUFFIX}": rng.standard_normal(shape).astype(np.float32)
        for path, shape in [("_trunk/_layers/0/w", (4, 3)), ("_trunk/_layers/0/b", (3,)), ("_heads/human/w", (3, 2))]
    }
    tensors["_CHECKPOINTABLE_OBJECT_GRAPH"] = np.array(object_graph(nodes), dtype=object)
    write_bundle(tmp_path / "sonnet", tensors)
    return TensorBundle(tmp_path / "sonnet"), tensors


SONNET_PATHS = {
    path: path + SUFFIX for path in ["module/_trunk/_layers/0/w", "module/_trunk/_layers/0/b", "module/_heads/human/w"]
}


def test_object_paths(tmp_path):
    bundle, tensors = _sonnet_bundle(tmp_path, tree_nodes(SONNET_PATHS))
    assert bundle.object_paths() == SONNET_PATHS
    for _path, key in bundle.object_paths().items():
        np.testing.assert_array_equal(bundle.read(key), tensors[key])


def test_object_paths_aliases_and_cycles(tmp_path):
    nodes = tree_nodes(SONNET_PATHS)
    ids = {name: i for children, _ in nodes for i, name in children}
    layers = ids["_layers"]
    nodes[ids["module"]][0].append((layers, "layers_alias"))  # a second path to the same layers
    nodes[layers][0].append((0, "root"))  # a cycle back to the root
    bundle, _ = _sonnet_bundle(tmp_path, nodes)
    expected = dict(SONNET_PATHS)
    expected["module/layers_alias/0/w"] = SONNET_PATHS["module/_trunk/_layers/0/w"]
    expected["module/layers_alias/0/b"] = SONNET_PATHS["module/_trunk/_layers/0/b"]
    assert bundle.object_paths() == expected


# --- the bundle TensorFlow 2.21 wrote for the official_small fixture -------------------------


@pytest.fixture(scope="module")
def official(official_bundle_dir):
    return TensorBundle(official_bundle_dir / "variables" / "variables")


def test_official_keys_and_shapes(official):
    listed = json.loads((DATA / "official_small" / "checkpoint_keys.json").read_text())["savedmodel_variables_keys"]
    assert official.keys() == [key for key, _ in listed]
    assert {key: official.shape(key) for key in official.keys()} == {key: tuple(shape) for key, shape in listed}


def test_official_every_tensor_verifies(official):
    dtypes = {}
    for key in official.keys():
        value = official.read(key)  # raises on any CRC mismatch
        assert value.shape == official.shape(key)
        dtypes[official.tf_dtype(key)] = dtypes.get(official.tf_dtype(key), 0) + 1
        if official.tf_dtype(key) == "float32":
            assert np.isfinite(value).all(), key
    assert dtypes == {"string": 1, "float32": 157, "int64": 28}


def test_official_object_paths(official):
    paths = official.object_paths()
    variables = [key for key in official.keys() if key != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert paths == {key[: -len(SUFFIX)]: key for key in variables}
    assert paths["model/_trunk/_layers/0/_layers/0/w"] == "model/_trunk/_layers/0/_layers/0/w" + SUFFIX
    assert official.shape(paths["model/_heads/human/_layers/0/w"]) == (768, 5313)


def test_official_values_match_npz(official):
    """The fixture's weights are bf16-representable: the npz keeps their upper 16 bits, under dotted module paths."""
    npz_path = DATA / "official_small" / "weights_bf16.npz"
    paths = official.object_paths()
    with np.load(npz_path) as packed:
        assert len(packed.files) > 100
        for name in packed.files:
            value = official.read(paths["model/" + name.replace(".", "/")])
            expected = (packed[name].astype(np.uint32) << 16).view(np.float32)
            assert value.dtype == np.float32, name
            np.testing.assert_array_equal(value, expected, err_msg=name)


# --- damaged bundles ------------------------------------------------------------------------


def _data_file(prefix) -> str:
    return str(prefix) + ".data-00000-of-00001"


def _flip_byte(path, offset, bit):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ bit]))


def test_missing_index(tmp_path):
    with pytest.raises(WeightsError, match=r"missing tensor bundle index file: .*nothing\.index"):
        TensorBundle(tmp_path / "nothing")


def test_missing_data_file(bundle_prefix):
    data = _data_file(bundle_prefix)
    os.remove(data)
    with pytest.raises(WeightsError, match=r"missing tensor bundle data file: .*ckpt\.data-00000-of-00001$"):
        TensorBundle(bundle_prefix)
    with open(f"{data}.xz", "wb"):  # as the test data ship it: compressed
        pass
    with pytest.raises(WeightsError, match=r"00001 \(.*ckpt\.data-00000-of-00001\.xz is beside it: decompress it "):
        TensorBundle(bundle_prefix)


def test_truncated_data_file(tmp_path):
    offsets = _write_test_bundle(tmp_path / "ckpt")
    path = _data_file(tmp_path / "ckpt")
    size = os.path.getsize(path)
    bundle = TensorBundle(tmp_path / "ckpt")
    last = max(offsets, key=offsets.get)
    os.truncate(path, size - 10)
    message = rf"ckpt\.data-00000-of-00001: truncated: tensor '{last}' needs bytes .* but the file has {size - 10} b"
    with pytest.raises(WeightsError, match=message):
        bundle.read(last)


def test_flipped_tensor_byte(tmp_path):
    offsets = _write_test_bundle(tmp_path / "ckpt")
    bundle = TensorBundle(tmp_path / "ckpt")
    _flip_byte(_data_file(tmp_path / "ckpt"), offsets["weights/big"] + 40_000, 0x10)
    with pytest.raises(WeightsError, match=r"ckpt\.data-00000-of-00001: CRC mismatch in tensor 'weights/big'"):
        bundle.read("weights/big")
    bundle.read("layers/000/w")  # the other tensors are still fine


def test_flipped_string_byte(tmp_path):
    offsets = _write_test_bundle(tmp_path / "ckpt")
    bundle = TensorBundle(tmp_path / "ckpt")
    _flip_byte(_data_file(tmp_path / "ckpt"), offsets["strings"] + 20, 1)  # inside the string bytes
    with pytest.raises(WeightsError, match=r"CRC mismatch in tensor 'strings'"):
        bundle.read("strings")


def test_truncated_index(bundle_prefix):
    index = str(bundle_prefix) + ".index"
    os.truncate(index, os.path.getsize(index) - 7)
    with pytest.raises(WeightsError, match=r"ckpt\.index: bad magic number; truncated or not a TensorFlow tensor"):
        TensorBundle(bundle_prefix)
    os.truncate(index, 30)
    with pytest.raises(WeightsError, match=r"ckpt\.index: file is only 30 bytes; truncated"):
        TensorBundle(bundle_prefix)


def test_wrong_magic(bundle_prefix):
    index = str(bundle_prefix) + ".index"
    with open(index, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00")
    with pytest.raises(WeightsError, match=r"ckpt\.index: bad magic number"):
        TensorBundle(bundle_prefix)


def test_flipped_index_byte(bundle_prefix):
    _flip_byte(str(bundle_prefix) + ".index", 100, 4)  # inside the first data block
    with pytest.raises(WeightsError, match=r"ckpt\.index: CRC mismatch in block at offset 0"):
        TensorBundle(bundle_prefix)


def test_unknown_key(bundle_prefix):
    bundle = TensorBundle(bundle_prefix)
    for method in (bundle.read, bundle.shape, bundle.dtype):
        with pytest.raises(WeightsError, match=r"ckpt\.index: no tensor named 'nope'"):
            method("nope")


def test_official_corruption(official_bundle_dir, tmp_path):
    """A flipped byte deep inside a large TF-written tensor is caught."""
    variables = tmp_path / "variables"
    shutil.copytree(official_bundle_dir / "variables", variables)
    bundle = TensorBundle(variables / "variables")
    key = "model/_heads/human/_layers/0/w" + SUFFIX
    data_file = variables / "variables.data-00000-of-00001"
    offset = data_file.read_bytes().find(bundle.read(key)[:2].tobytes())
    assert offset >= 0
    _flip_byte(data_file, offset + 9_999_999, 0x80)
    with pytest.raises(WeightsError, match=rf"CRC mismatch in tensor '{key}'"):
        bundle.read(key)


@pytest.mark.parametrize(
    "patch, message",
    [
        (field_varint(1, 20), r"tensor 'x' has unsupported dtype enum 20"),
        (field_varint(5, 12), r"tensor 'x' has 12 bytes, but shape \(2, 2\) of float32 needs 16"),
        (field_bytes(7, b""), r"tensor 'x' is a partitioned \(sliced\) variable"),
    ],
    ids=["unknown-dtype", "wrong-size", "sliced"],
)
def test_bad_entries(tmp_path, patch, message):
    write_bundle(tmp_path / "ckpt", {"x": np.ones((2, 2), np.float32)}, entry_patches={"x": patch})
    with pytest.raises(WeightsError, match=r"ckpt\.index: " + message):
        TensorBundle(tmp_path / "ckpt").read("x")
