"""Inception-v3 (FID and torchvision variants) against golden PyTorch outputs, and its weight files.

The references (pytorch-fid's `fid_inception_v3`, `torchvision.models.inception_v3`) need torchvision, which
cannot live next to the project's torch, so `fixtures/make_inception_fixtures.py` ran them once on the
deterministic numpy weights and inputs of `inception_weights.py`; here the same arrays are rebuilt, written as
a torch-layout safetensors file and loaded with the project's loader. No torch needed, except to write a .pth.
"""
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import inception_weights as iw
from nsync_jax import weights
from nsync_jax.convert import convert_inception
from nsync_jax.errors import UserError
from nsync_jax.models.inception import InceptionV3, load_inception

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCE = 1e-4


def rel_error(ours, reference) -> float:
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def torch_state(variant: str, num_classes=None) -> dict[str, np.ndarray]:
    """The deterministic weights in torch layout, named and shaped after the Flax module."""
    abstract = weights.abstract_module(lambda rngs: InceptionV3(variant, num_classes=num_classes, rngs=rngs))
    shapes = {weights.torch_key(path): weights.to_torch_layout(np.empty(v.shape, np.uint8), path).shape
              for path, v in nnx.to_flat_state(nnx.state(abstract))}
    return iw.random_state_dict(shapes)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inception")
    files = {}
    for variant in iw.CASES:
        files[variant] = folder / f"{variant}.safetensors"
        save_file(torch_state(variant), files[variant])
    return files


def run(model: InceptionV3, images: np.ndarray) -> dict[str, np.ndarray]:
    """What the fixtures hold: pool3, logits and the per-image channel means of `iw.STAGES`."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def outputs(state, images):
        out = nnx.merge(graphdef, state).stages(images)
        return {"pool3": out["pool3"], "logits": out["logits"],
                **{stage: out[stage].mean(axis=(1, 2)) for stage in iw.STAGES}}

    return jax.device_get(outputs(state, images))


def fixture(variant: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / f"inception_{variant}.npz"))


def test_fixtures_match_the_cases():
    for variant, cases in iw.CASES.items():
        spec = json.loads(str(fixture(variant)["spec"]))
        assert spec["cases"] == cases and spec["weight_seed"] == iw.WEIGHT_SEED
        assert tuple(spec["stages"]) == iw.STAGES


@pytest.mark.parametrize("variant, case_name", [(v, c) for v, cases in iw.CASES.items() for c in cases])
def test_matches_pytorch(variant, case_name, weight_files):
    case = iw.CASES[variant][case_name]
    model = load_inception(weight_files[variant], variant, transform_input=case["transform_input"])
    ours, reference = run(model, iw.images(case)), fixture(variant)
    errors = {key: rel_error(value, reference[f"{case_name}.{key}"]) for key, value in ours.items()}
    print(f"{variant}/{case_name} relative errors: {errors}")
    assert ours["pool3"].shape == (case["batch"], 2048)
    assert max(errors.values()) <= TOLERANCE, errors


def test_variants_differ_on_the_same_weights(weight_files):
    """The FID weights run as the torchvision variant (avg pools with padding, no 7c max pool) give other
    features: the variant flag is not ignored."""
    case = iw.CASES["fid"]["odd"]
    model = load_inception(weight_files["fid"], "torchvision", num_classes=1008)
    assert rel_error(run(model, iw.images(case))["pool3"], fixture("fid")["odd.pool3"]) > 0.05


def test_convert_pth_drops_aux_logits(tmp_path):
    torch = pytest.importorskip("torch")
    state = torch_state("torchvision")
    extra = {"AuxLogits.conv0.conv.weight": np.ones((128, 768, 1, 1), np.float32),
             "Mixed_5b.branch1x1.bn.num_batches_tracked": np.array(7)}
    src = tmp_path / "inception_v3_google.pth"
    torch.save({k: torch.from_numpy(v) for k, v in {**state, **extra}.items()}, src)
    dst = convert_inception(src, tmp_path / "out" / "inception.safetensors", "torchvision")
    converted = load_file(dst)
    assert converted.keys() == state.keys()
    assert all(np.array_equal(converted[k], state[k]) for k in state)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["inception.safetensors"]  # no temporary left
    load_inception(dst, "torchvision")


def test_convert_weights_command(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from nsync_jax.cli import main

    state = torch_state("fid")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "pt_inception.pth")
    dst = tmp_path / "inception-fid.safetensors"
    assert main(["convert-weights", "inception-fid", str(tmp_path / "pt_inception.pth"), str(dst)]) == 0
    assert f"wrote {dst}" in capsys.readouterr().out
    assert load_file(dst).keys() == state.keys()
    load_inception(dst, "fid")


def test_convert_rejects_the_wrong_variant_or_shape(weight_files, tmp_path):
    dst = tmp_path / "out.safetensors"
    # torchvision's 1000 classes are not the FID network's 1008.
    with pytest.raises(UserError, match=r"torchvision\.safetensors.*'fc\.(weight|bias)'.*'fid' Inception-v3"):
        convert_inception(weight_files["torchvision"], dst, "fid")
    state = load_file(weight_files["fid"])
    key = "Mixed_6b.branch7x7_2.conv.weight"  # a 1x7 kernel given as 7x1
    save_file({**state, key: state[key].transpose(0, 1, 3, 2)}, tmp_path / "transposed.safetensors")
    with pytest.raises(UserError, match=r"transposed\.safetensors.*Mixed_6b\.branch7x7_2\.conv\.weight"):
        convert_inception(tmp_path / "transposed.safetensors", dst, "fid")
    del state["fc.bias"]
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(UserError, match=r"partial\.safetensors.*missing weight 'fc\.bias'"):
        load_inception(tmp_path / "partial.safetensors", "fid")
    assert not dst.exists()


def test_missing_file_and_bad_arguments(weight_files, tmp_path):
    with pytest.raises(UserError, match="nowhere.safetensors"):
        load_inception(tmp_path / "nowhere.safetensors", "fid")
    with pytest.raises(UserError, match=r"pt_inception\.pth"):
        convert_inception(tmp_path / "pt_inception.pth", tmp_path / "out.safetensors", "fid")
    with pytest.raises(UserError, match="variant 'tf'"):
        load_inception(weight_files["fid"], "tf")
    with pytest.raises(UserError, match=r"out\.npz.*\.safetensors"):
        convert_inception(weight_files["fid"], tmp_path / "out.npz", "fid")
