"""enformer-pytorch checkpoints load and give that package's outputs on the same input."""
import json

import enformer_pytorch
import numpy as np
import pytest
import torch
from enformer_pytorch import modeling_enformer as modeling
from helpers import DATA, relative_error
from safetensors.torch import save_model

from enformer_vep import load_model


@pytest.fixture(scope="module")
def their_model():
    """A small random enformer-pytorch model whose positional features are the official ones.

    Its `use_tf_gamma` option swaps in a TF gamma table (for 192 features at T = 1536, hence
    channels / heads = 384 / 2); that package's table is not the 2022 official one, so it is
    replaced by the official float32 values, the only intended difference between the two ports.
    """
    official = np.load(DATA / "positional_features.npz")["F192_T1536"][:, 64:96]
    modeling.TF_GAMMAS = torch.from_numpy(official.copy())
    torch.manual_seed(7)
    model = enformer_pytorch.Enformer.from_hparams(dim=384, depth=2, heads=2, output_heads={"human": 11, "mouse": 5},
                                                   use_tf_gamma=True)
    with torch.no_grad():  # random everything, including batch-norm statistics and zero-initialised layers
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                scale = 1.0 / np.sqrt(tensor.shape[-1]) if tensor.ndim > 1 else 0.1
                tensor.copy_(torch.randn_like(tensor) * scale)
                if name.endswith("running_var"):
                    tensor.abs_().add_(0.5)
    return model.eval()


@pytest.fixture(scope="module")
def sequence():
    rng = np.random.default_rng(3)
    onehot = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 196_608)]
    onehot[1000:1500] = 0  # a run of N
    return torch.from_numpy(onehot[None])


def _their_outputs(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("form", ["pytorch_model.bin", "model.safetensors"])
def test_enformer_pytorch_checkpoint_gives_its_outputs(tmp_path, their_model, sequence, form):
    if form == "pytorch_model.bin":
        (tmp_path / "config.json").write_text(json.dumps(their_model.config.to_dict()))
        torch.save(their_model.state_dict(), tmp_path / form)
    else:  # safetensors keeps one name of each shared tensor (`_trunk.N.*` or the named module)
        (tmp_path / "config.json").write_text(json.dumps(their_model.config.to_dict()))
        save_model(their_model, str(tmp_path / form))
    assert (tmp_path / form).is_file()
    ours = load_model(tmp_path)
    assert ours.config.channels == 384 and ours.config.num_heads == 2 and ours.config.num_transformer_layers == 2
    theirs = _their_outputs(their_model, sequence)
    got = ours.predict(sequence)
    for head in ("human", "mouse"):
        assert relative_error(got[head].numpy(), theirs[head].numpy()) <= 1e-5, head
