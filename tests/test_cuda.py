"""On a CUDA device: the CPU's numbers, no host sync in the training step but the NaN guard's,
AMP, the training loop with resume, and post-processing. Skipped where torch sees no GPU."""

import copy
import warnings

import pytest
import torch

from conftest import tiny_overrides, train_overrides, varied_model
from retinanet import build_model, load_config
from retinanet.engine.trainer import build_state, train_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 convolutions and matmuls differ from the CPU's float32 by ~1e-3: compare in true float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_batch(device, seed=0):
    """Two images of different sizes; the second has no box."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 120, 150, generator=g), torch.rand(3, 100, 128, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 140.0, 110.0], [5.0, 5.0, 25.0, 20.0]]),
         "labels": torch.tensor([0, 2, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def host_syncs(fn):
    """Run fn() and return (its result, "file:line" of every synchronizing CUDA call it made)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, [f"{w.filename}:{w.lineno}" for w in caught if "called a synchronizing" in str(w.message)]


def test_training_losses_and_gradients_equal_cpu():
    torch.manual_seed(0)
    cpu_model = build_model(load_config(None, tiny_overrides())).train()
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)
    results = {}
    for name, model, device in (("cpu", cpu_model, "cpu"), ("cuda", cuda_model, CUDA)):
        images, targets = make_batch(device)
        losses = model(images, targets)
        sum(losses.values()).backward()
        grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = ({k: v.detach().cpu() for k, v in losses.items()}, grads)
    (cpu_losses, cpu_grads), (cuda_losses, cuda_grads) = results["cpu"], results["cuda"]
    for key in cpu_losses:
        torch.testing.assert_close(cuda_losses[key], cpu_losses[key], rtol=1e-4, atol=1e-6)
    assert cpu_grads.keys() == cuda_grads.keys() and len(cpu_grads) > 50
    for name in cpu_grads:
        torch.testing.assert_close(cuda_grads[name], cpu_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def assert_same_detections(got, expected):
    """Equal up to the order of near-equal scores: each detection has a twin on the other side (same
    label, box to 1e-3, score to 1e-4), one to one."""
    for d, e in zip(got, expected):
        d = {k: v.cpu() for k, v in d.items()}
        assert d["scores"].shape == e["scores"].shape
        distance = (d["boxes"][:, None] - e["boxes"][None]).abs().amax(dim=2)  # (D, D)
        distance = distance + (d["labels"][:, None] != e["labels"][None, :]) * 1e9
        closest, twin = distance.min(dim=1)
        assert (closest < 1e-3).all(), closest.max()
        assert twin.unique().numel() == twin.numel()
        torch.testing.assert_close(d["scores"], e["scores"][twin], rtol=1e-4, atol=1e-5)


def test_detections_equal_cpu():
    model, _ = varied_model()
    images, _ = make_batch("cpu", seed=1)
    with torch.no_grad():
        expected = model(images)
        got = copy.deepcopy(model).to(CUDA)([i.to(CUDA) for i in images])
    assert sum(d["scores"].numel() for d in expected) > 50
    assert_same_detections(got, expected)


def test_training_forward_and_backward_never_sync_the_host():
    torch.manual_seed(0)
    model = build_model(load_config(None, tiny_overrides())).to(CUDA).train()
    images, targets = make_batch(CUDA)

    def step():
        losses = model(images, targets)
        sum(losses.values()).backward()
        return losses

    step()  # first call: cuDNN / cuBLAS set-up, anchor cache
    losses, syncs = host_syncs(step)
    assert syncs == [], syncs
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_train_step_syncs_once(amp):
    """The NaN guard's all-reduce + read is the step's one sync (fp16's GradScaler adds its own)."""
    cfg = load_config(None, tiny_overrides() + [f"solver.amp={amp}", "solver.clip_grad_norm=5.0"])
    torch.manual_seed(0)
    state = build_state(cfg, CUDA, ["a", "b", "c"])
    images, targets = make_batch(CUDA)
    train_step(state.model, state, images, targets, amp=amp, clip_grad_norm=5.0)
    (losses, stop), syncs = host_syncs(
        lambda: train_step(state.model, state, images, targets, amp=amp, clip_grad_norm=5.0)
    )
    assert len(syncs) == 1 and "distributed.py" in syncs[0], syncs
    assert stop is False and state.iteration == 2
    assert all(torch.isfinite(v) for v in losses.values())


def test_fp16_amp_steps_update_the_weights():
    cfg = load_config(None, tiny_overrides() + ["solver.amp=fp16"])
    torch.manual_seed(0)
    state = build_state(cfg, CUDA, ["a", "b", "c"])
    before = copy.deepcopy(state.model.state_dict())
    images, targets = make_batch(CUDA)
    for _ in range(3):
        losses, _ = train_step(state.model, state, images, targets, amp="fp16")
        assert all(torch.isfinite(v) for v in losses.values())
    after = state.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_training_run_on_cuda_resumes(synthetic_root, tmp_path, monkeypatch):
    """The loop on the GPU: checkpoints, evaluation and --resume; cuDNN is not bit-deterministic
    (upsampling's backward adds atomically), so the resumed losses are compared to a tolerance."""
    import test_trainer
    from retinanet.checkpoint import load_checkpoint
    from retinanet.engine.trainer import TrainingStopped, find_last_checkpoint, train

    def cfg(out):
        overrides = train_overrides(synthetic_root, out) + ["train.device=cuda", "train.deterministic=true"]
        return load_config(None, overrides)

    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    try:
        metrics = train(cfg(full_dir))
        assert "AP" in metrics
        test_trainer.stop_after(monkeypatch, 3, "sigterm")
        with pytest.raises(TrainingStopped):
            train(cfg(split_dir))
        assert load_checkpoint(find_last_checkpoint(split_dir))["iteration"] == 4
        monkeypatch.undo()
        train(cfg(split_dir), resume=True)
    finally:
        torch.use_deterministic_algorithms(False)  # train.deterministic set it for the whole process
    full, split = test_trainer.read_losses(full_dir), test_trainer.read_losses(split_dir)
    assert sorted(split) == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([split[i] for i in range(1, 7)]),
                               torch.tensor([full[i] for i in range(1, 7)]), rtol=1e-3, atol=1e-5)


def test_postprocess_on_cuda_equals_cpu():
    from test_postprocess import random_outputs

    from retinanet.modeling import BoxCoder, PostProcessor

    post = PostProcessor(BoxCoder(), score_thresh=0.05, topk_candidates=100, nms_thresh=0.5, detections_per_image=50)
    cls, box, anchors = random_outputs(3, [3000, 700, 200], num_classes=20, seed=5)
    cls = [c - 4 for c in cls]
    sizes = [(180, 200), (150, 160), (200, 120)]
    expected = post(cls, box, anchors, sizes)
    got = post([c.to(CUDA) for c in cls], [b.to(CUDA) for b in box], [a.to(CUDA) for a in anchors], sizes)
    assert all(e["scores"].numel() == 50 for e in expected)
    assert_same_detections(got, expected)


def test_compiled_inference_with_cuda_graphs_equals_eager():
    """The low-latency path as users get it on a GPU (inductor, CUDA graphs): three widths compile
    twice (static, then a dynamic width) and replay; detections equal eager's, and no compile
    failure sent it back to eager."""
    from retinanet.inference import Detector

    model, _ = varied_model()
    generator = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 128, width, generator=generator) for width in (128, 200, 250)]
    expected = Detector(copy.deepcopy(model), CUDA).predict(images, batch_size=1)
    detector = Detector(copy.deepcopy(model), CUDA, compile=True)
    for _ in range(3):  # compile, CUDA graph warm-up and recording, replay
        got = detector.predict(images, batch_size=1)
    assert detector.compiled
    assert sum(d["scores"].numel() for d in expected) > 30
    tensors_only = [[{k: v for k, v in d.items() if k != "class_names"} for d in ds] for ds in (got, expected)]
    assert_same_detections(*tensors_only)
