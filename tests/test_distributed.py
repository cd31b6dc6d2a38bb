"""2-rank training on CPU (gloo): DDP and FSDP2 (one unit per decoder block) give the one-process weights,
also when the ranks' micro-batches have different thought counts, each gradient is reduced once per
optimizer step, checkpoints resume on another rank count, bf16 autocast works on CPU."""
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from coconut_engine.checkpoint import checkpoint_dirs
from coconut_engine.coconut import CoconutModel, CoconutSample, SpecialTokens
from coconut_engine.config import ModelConfig
from coconut_engine.distributed import DistEnv, DistributedError, leave_process_group
from coconut_engine.model import Decoder
from coconut_engine.trainer import TrainConfig, Trainer, TrainingError

TASK = {"num_concepts": 6, "extra_edges": 1, "person_facts": 0, "min_steps": 2, "max_steps": 2, "concept_pool": 12}


def config(save_dir, shared: Path | None = None, **overrides) -> dict:
    """2 epochs of 3 steps (40 samples, batch 16: the last batch has 8), stage 0 then stage 1, gradient
    accumulation 2, and an optimizer that is not reset at the stage switch (a resume needs its state).
    With `shared` (an earlier run's directory), its data and tokenizer (training a tokenizer takes
    seconds)."""
    values = dict(save_dir=str(save_dir), model="builtin:gpt2-micro", task_train_size=40, task_val_size=6,
                  batch_size=16, gradient_accumulation_steps=2, num_epochs=2, epochs_per_stage=1, max_latent_stage=2,
                  reset_optimizer=False, lr=1e-4, eval_max_new_tokens=4, attention_backend="torch", progress=False,
                  task_config=TASK, keep_checkpoints=3)
    if shared is not None:
        values.update(train_path=str(shared / "data" / "train.json"), val_path=str(shared / "data" / "val.json"),
                      tokenizer=str(shared / "tokenizer"))
    values.update(overrides)
    return values


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_and_count(values: dict, out: Path, rank: int) -> None:
    """Train one config on this rank, count what reaches autograd and DDP's reducer, record each
    micro-batch's longest thought chain and the thought steps it ran, and under FSDP how the model is
    sharded; save it all. `values` may hold `defer_weight_grads` (the CoconutModel's setting)."""
    values = dict(values)
    defer = values.pop("defer_weight_grads", None)
    trainer = Trainer(TrainConfig(**values))
    trainer.model.defer_weight_grads = defer
    names = {p: n for n, p in trainer.model.named_parameters()}  # the decoder and the thought transform
    accumulated = {n: 0 for n in names.values()}
    reduced = {n: 0 for n in names.values()}
    forwards = {"n": 0}
    for p, n in names.items():  # DDP's reducer hook runs where this one does: after the grad is accumulated
        p.register_post_accumulate_grad_hook(lambda _p, n=n: accumulated.__setitem__(n, accumulated[n] + 1))
    if isinstance(trainer.train_model, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_allreduce(state, bucket):
            for p in bucket.parameters():
                reduced[names[p]] += 1
            return allreduce_hook(state, bucket)

        trainer.train_model.register_comm_hook(None, counting_allreduce)
    trainer.train_model.register_forward_hook(lambda *_: forwards.__setitem__("n", forwards["n"] + 1))
    thought_steps = []  # per micro-batch: (this rank's longest thought chain, the thought steps run)
    sharded_grads = []  # per micro-batch: whether every parameter holds a sharded gradient when it starts
    trainer.train_model.register_forward_pre_hook(
        lambda _m, args, kwargs: thought_steps.append((max(s.num_thoughts for s in args[0]), kwargs["thought_steps"])),
        with_kwargs=True)
    trainer.train_model.register_forward_pre_hook(lambda *_: sharded_grads.append(
        all(type(p.grad).__name__ == "DTensor" for p in trainer.model.parameters())), prepend=True)  # before FSDP's
    block_dtypes = set()  # the first block's weight as its forward sees it (after FSDP's all-gather)
    trainer.decoder.layers[0].register_forward_pre_hook(
        lambda block, _args: block_dtypes.add((type(block.attn.qkv_proj.weight).__name__,
                                               block.attn.qkv_proj.weight.dtype)))
    history = trainer.run()
    torch.save({"accumulated": accumulated, "reduced": reduced, "micro_batches": forwards["n"],
                "steps": trainer.global_step, "history": history, "resumed_from": trainer.resumed_from,
                "generations": trainer.last_generations, "thought_steps": thought_steps, "sharded_grads": sharded_grads,
                "block_dtypes": block_dtypes, "sharding": _sharding(trainer)}, out / f"rank{rank}.pt")


def _sharding(trainer) -> dict:
    """Which modules are FSDP2 units, and each parameter's type, placements, mesh size and local shape."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    units = [name for name, m in trainer.train_model.named_modules() if isinstance(m, FSDPModule)]
    params = {name: (type(p).__name__, tuple((type(pl).__name__, getattr(pl, "dim", None)) for pl in p.placements),
                     p.device_mesh.size(), tuple(p.to_local().shape),
                     tuple(p.shape), p.dtype)
              for name, p in trainer.train_model.named_parameters() if isinstance(p, DTensor)}
    return {"units": units, "params": params, "all": [n for n, _ in trainer.train_model.named_parameters()]}


def _rank_main(rank: int, world: int, port: int, jobs: list[tuple[dict, str, str | None]]) -> None:
    """One rank under torchrun's environment variables: each job (config, output folder, checkpoint to
    start from: copied into the run's directory first) in turn, in one process group."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    for values, out, start_from in jobs:
        if start_from is not None and rank == 0:
            shutil.copytree(start_from, Path(values["save_dir"]) / Path(start_from).name)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        Path(out).mkdir(parents=True, exist_ok=True)
        _train_and_count(values, Path(out), rank)
    leave_process_group()


RANKS_TIMEOUT_S = 600  # ranks that disagree on their collectives wait forever: fail the test, not the CI job


def spawn_ranks(fn, args: tuple, nprocs: int, timeout_s: float = RANKS_TIMEOUT_S) -> None:
    """`mp.spawn(fn, args, nprocs)` that kills the ranks and fails the test after `timeout_s`."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            for process in context.processes:
                process.join(5)
            pytest.fail(f"{nprocs} ranks of {fn.__name__} still running after {timeout_s} s (hung in a collective?)")


def _sleeping_rank(rank: int, seconds: float) -> None:
    time.sleep(seconds)


def test_hung_ranks_fail_the_test_instead_of_hanging_it():
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="still running after 2 s"):
        spawn_ranks(_sleeping_rank, (120,), nprocs=2, timeout_s=2)
    assert time.monotonic() - started < 60


def run_ranks(jobs: list[tuple[dict, Path, Path | None]], world: int = 2) -> list[list[dict]]:
    """Run the jobs on `world` spawned ranks; per job, each rank's results."""
    spawn_ranks(_rank_main, (world, _free_port(), [(v, str(o), s and str(s)) for v, o, s in jobs]), nprocs=world)
    return [[torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)] for _, out, _ in jobs]


def final_weights(save_dir) -> dict:
    from coconut_engine.loader import load_model

    return dict(load_model(checkpoint_dirs(save_dir)[-1]).named_parameters())


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].detach(), b[name].detach(), atol=atol, rtol=0, msg=name)


def mixed_config(save_dir, shared: Path, **overrides) -> dict:
    """As `config`, with every other sample at a random stage (`uniform_prob`, 0 to 2 thoughts in
    both epochs): the two ranks' micro-batches then have different longest thought chains."""
    return config(save_dir, shared, uniform_prob=0.5, **overrides)


def pause_config(save_dir, shared: Path) -> dict:
    """Stage 1 from the first epoch in the pause_as_thought ablation, no accumulation, 2 steps (24 + 16)."""
    return config(save_dir, shared, mode="pause_as_thought", num_epochs=1, stage0_epochs=0,
                  gradient_accumulation_steps=1, batch_size=24)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process reference runs, then in one 2-rank job: their DDP twins, the FSDP2 twin, and the
    DDP run's first checkpoint resumed under FSDP2."""
    root = tmp_path_factory.mktemp("dist")
    single = Trainer(TrainConfig(**config(root / "single")))
    single.run()
    shared = root / "single"
    pause = Trainer(TrainConfig(**pause_config(root / "pause", shared)))
    pause.run()
    linear = Trainer(TrainConfig(**config(root / "linear", shared, thought_transform="linear")))
    linear.run()
    mixed = Trainer(TrainConfig(**mixed_config(root / "mixed", shared)))
    mixed.run()
    jobs = [(config(root / "ddp", shared), root / "out-ddp", None),
            (config(root / "ddp-linear", shared, thought_transform="linear"), root / "out-ddp-linear", None),
            (pause_config(root / "ddp-pause", shared), root / "out-ddp-pause", None),
            (config(root / "fsdp", shared, parallel="fsdp"), root / "out-fsdp", None),
            (config(root / "fsdp-resumed", shared, parallel="fsdp", resume=True), root / "out-fsdp-resumed",
             root / "ddp" / "checkpoint-0001"),
            (mixed_config(root / "fsdp-mixed", shared, parallel="fsdp", defer_weight_grads=False),
             root / "out-fsdp-mixed", None),
            (mixed_config(root / "fsdp-mixed-deferred", shared, parallel="fsdp", defer_weight_grads=True),
             root / "out-fsdp-mixed-deferred", None),
            (dict(pause_config(root / "fsdp-pause", shared), parallel="fsdp"), root / "out-fsdp-pause", None),
            (config(root / "fsdp-bf16", shared, parallel="fsdp", bf16=True, num_epochs=1,
                    gradient_accumulation_steps=1), root / "out-fsdp-bf16", None),
            (config(root / "fsdp-linear", shared, parallel="fsdp", thought_transform="linear"),
             root / "out-fsdp-linear", None)]
    (ddp, ddp_linear, ddp_pause, fsdp, fsdp_resumed, fsdp_mixed, fsdp_deferred, fsdp_pause, fsdp_bf16,
     fsdp_linear) = run_ranks(jobs)
    return {"root": root, "single": single, "pause": pause, "linear": linear, "mixed": mixed, "ddp": ddp,
            "ddp_linear": ddp_linear, "ddp_pause": ddp_pause, "fsdp": fsdp, "fsdp_resumed": fsdp_resumed,
            "fsdp_mixed": fsdp_mixed, "fsdp_mixed_deferred": fsdp_deferred, "fsdp_pause": fsdp_pause,
            "fsdp_bf16": fsdp_bf16, "fsdp_linear": fsdp_linear}


def test_ddp_two_ranks_give_the_one_process_weights(runs):
    root, single = runs["root"], runs["single"]
    assert [m["stage"] for m in single.history] == [0, 1]
    assert_same_weights(final_weights(root / "ddp"), dict(single.decoder.named_parameters()))
    for rank in runs["ddp"]:  # same train loss (all-reduced) and the same gathered evaluation on every rank
        assert [m["train_loss"] for m in rank["history"]] == pytest.approx([m["train_loss"] for m in single.history],
                                                                             rel=1e-5)
        assert [m["accuracy"] for m in rank["history"]] == [m["accuracy"] for m in single.history]
        assert [g["question"] for g in rank["generations"]] == [g["question"] for g in single.last_generations]


def test_ddp_reduces_each_gradient_once_per_step(runs):
    """Deferred weight gradients, the loss node and the gradient pages hand each parameter's gradient
    to autograd once per backward (stage-0 batches without thoughts included), and no_sync keeps the
    all-reduce to the step's last micro-batch: one reduction per parameter per optimizer step."""
    for rank in runs["ddp"]:
        assert rank["steps"] == 6 and rank["micro_batches"] == 12  # 3 steps x 2 epochs, 2 micro-batches each
        assert set(rank["accumulated"].values()) == {rank["micro_batches"]}
        assert set(rank["reduced"].values()) == {rank["steps"]}


def test_ddp_pause_as_thought(runs):
    assert_same_weights(final_weights(runs["root"] / "ddp-pause"), dict(runs["pause"].decoder.named_parameters()))
    for rank in runs["ddp_pause"]:
        assert set(rank["accumulated"].values()) == {rank["micro_batches"]} == {2}
        assert set(rank["reduced"].values()) == {rank["steps"]} == {2}


def test_ddp_with_a_learned_thought_transform(runs):
    """Stage-0 steps leave the transform without a gradient: DDP must expect unused parameters (without,
    the second step fails in the reducer), and the run still gives the one-process weights."""
    assert all(rank["steps"] == 6 for rank in runs["ddp_linear"])
    assert_same_weights(final_weights(runs["root"] / "ddp-linear"), dict(runs["linear"].decoder.named_parameters()))


def test_fsdp_two_ranks_give_the_one_process_weights(runs):
    single = runs["single"]
    assert_same_weights(final_weights(runs["root"] / "fsdp"), dict(single.decoder.named_parameters()))
    for rank in runs["fsdp"]:
        assert rank["steps"] == 6
        assert [m["accuracy"] for m in rank["history"]] == [m["accuracy"] for m in single.history]


@pytest.mark.parametrize("run", ["fsdp_mixed", "fsdp_mixed_deferred"])
def test_fsdp_per_block_with_different_thought_counts_on_the_ranks(runs, run):
    """Each rank's micro-batch has its own longest thought chain (some ranks none at all, down to a
    whole micro-batch at stage 0 on one rank while the other thinks): every rank runs the agreed
    count of thought steps (the others without rows), with and without deferred weight gradients,
    and the weights are the one-process run's."""
    single = runs["mixed"]
    assert [m["stage"] for m in single.history] == [0, 1]
    ranks = runs[run]
    for rank in ranks:
        assert rank["steps"] == 6 and rank["micro_batches"] == 12
    per_micro = list(zip(*(rank["thought_steps"] for rank in ranks)))
    assert all(len({steps for _, steps in micro}) == 1 for micro in per_micro)  # the same on both ranks
    assert all(steps == max(longest for longest, _ in micro) for micro in per_micro for _, steps in micro)
    assert any(len({longest for longest, _ in micro}) > 1 for micro in per_micro)  # the data makes them differ
    assert any(0 == min(longest for longest, _ in micro) < max(longest for longest, _ in micro) for micro in per_micro)
    assert_same_weights(final_weights(runs["root"] / run.replace("_", "-")), dict(single.decoder.named_parameters()))


def test_fsdp_reduce_scatters_every_micro_batch(runs):
    """Gradient accumulation keeps FSDP2's gradients sharded: the step's first micro-batch is reduce-scattered
    before the second starts (skipping it would hold each block's whole gradient on every rank)."""
    for rank in runs["fsdp_mixed"]:
        assert rank["sharded_grads"] == [False, True] * 6


def test_fsdp_with_a_learned_thought_transform(runs):
    """The transform's parameters live in the root unit; evaluation and checkpoints gather them with the
    decoder's (before: refused under fsdp)."""
    from safetensors.torch import load_file

    single = runs["linear"]
    assert all(rank["steps"] == 6 for rank in runs["fsdp_linear"])
    assert_same_weights(final_weights(runs["root"] / "fsdp-linear"), dict(single.decoder.named_parameters()))
    saved = load_file(checkpoint_dirs(runs["root"] / "fsdp-linear")[-1] / "thought_transform.safetensors")
    assert_same_weights(saved, dict(single.model.thought_transform.named_parameters()))
    assert [m["accuracy"] for m in runs["fsdp_linear"][0]["history"]] == [m["accuracy"] for m in single.history]


def test_fsdp_pause_as_thought(runs):
    assert all(rank["steps"] == 2 for rank in runs["fsdp_pause"])
    assert_same_weights(final_weights(runs["root"] / "fsdp-pause"), dict(runs["pause"].decoder.named_parameters()))


def test_fsdp_shards_each_decoder_block_with_bf16_parameters_in_the_forward(runs):
    """Each block is its own FSDP2 unit beside the root; every parameter is a DTensor sharded over the 2
    ranks (dim 0), fp32 at rest; under `bf16: true` a block's forward sees whole bf16 weights."""
    for rank in runs["fsdp_bf16"]:
        sharding = rank["sharding"]
        assert sharding["units"] == ["", "decoder.layers.0", "decoder.layers.1"]
        assert set(sharding["params"]) == set(sharding["all"])
        for name, (kind, placements, mesh, local, whole, dtype) in sharding["params"].items():
            assert (kind, placements, mesh, dtype) == ("DTensor", (("Shard", 0),), 2, torch.float32), name
            assert local[0] == -(-whole[0] // 2) or local[0] == whole[0] // 2, name
        assert rank["block_dtypes"] == {("Parameter", torch.bfloat16)}
    assert runs["fsdp"][0]["block_dtypes"] == {("Parameter", torch.float32)}  # fp32 without bf16
    fp32 = runs["single"].history[0]["train_loss"]
    for rank in runs["fsdp_bf16"]:
        bf16 = rank["history"][0]["train_loss"]
        assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=1e-2)


def test_a_two_rank_checkpoint_resumes_on_two_ranks_under_fsdp(runs):
    """The DDP run's first checkpoint (optimizer state in the plain layout) resharded by FSDP2."""
    assert all(rank["resumed_from"].name == "checkpoint-0001" and rank["steps"] == 6 for rank in runs["fsdp_resumed"])
    assert_same_weights(final_weights(runs["root"] / "fsdp-resumed"), dict(runs["single"].decoder.named_parameters()))


def test_a_two_rank_checkpoint_resumes_on_one_rank(runs, tmp_path):
    root, single = runs["root"], runs["single"]
    shutil.copytree(checkpoint_dirs(root / "ddp")[0], tmp_path / "checkpoint-0001")
    resumed = Trainer(TrainConfig(**config(tmp_path, root / "single", resume=True)))
    assert resumed.epochs_done == 1
    resumed.run()
    assert_same_weights(dict(resumed.decoder.named_parameters()), dict(single.decoder.named_parameters()))


# -- bf16 on CPU ------------------------------------------------------------------------------------

def _tiny_model() -> CoconutModel:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"model_type": "gpt2", "vocab_size": 60, "n_embd": 64, "n_layer": 2, "n_head": 4,
                                 "n_positions": 256})
    decoder = Decoder(cfg, attention_backend="torch")
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(0.0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.0)
    return CoconutModel(decoder, SpecialTokens(bot=57, thought=58, eot=59))


def _samples() -> list[CoconutSample]:
    g = torch.Generator().manual_seed(1)
    return [CoconutSample(torch.randint(0, 56, (4 + 3 * i,), generator=g).tolist(), k,
                          torch.randint(0, 56, (5,), generator=g).tolist()) for i, k in enumerate([2, 0, 1, 3])]


def test_bf16_autocast_on_cpu_is_close_to_fp32_in_every_mode():
    model, samples = _tiny_model(), _samples()
    fp32 = model(samples, mode="paged")
    losses = {}
    for mode in ("paged", "two_pass", "multipass", "recompute"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[mode] = model(samples, mode=mode)
        losses[mode].backward()
    assert losses["paged"].item() != fp32.item()  # bf16 really ran
    for mode, loss in losses.items():
        assert loss.item() == pytest.approx(fp32.item(), rel=1e-2), mode
        assert loss.item() == pytest.approx(losses["paged"].item(), rel=1e-2), mode


def test_bf16_true_trains_in_bf16_on_cpu(runs, tmp_path):
    shared = runs["root"] / "single"
    fp32 = Trainer(TrainConfig(**config(tmp_path / "fp32", shared, num_epochs=1, gradient_accumulation_steps=1)))
    bf16 = Trainer(TrainConfig(**config(tmp_path / "bf16", shared, num_epochs=1, gradient_accumulation_steps=1,
                                        bf16=True)))
    a, b = fp32.run()[0]["train_loss"], bf16.run()[0]["train_loss"]
    assert a != b  # before: bf16 was silently ignored on CPU and the losses were equal
    assert b == pytest.approx(a, rel=1e-2)


# -- set-up -----------------------------------------------------------------------------------------

def test_each_rank_selects_its_own_gpu_before_touching_cuda(monkeypatch):
    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    assert DistEnv(rank=1, world_size=1, local_rank=1).start(None) == torch.device("cuda", 1)
    assert selected == [torch.device("cuda", 1)]
    with pytest.raises(DistributedError, match="cuda:3.*LOCAL_RANK=3.*2 CUDA device"):
        DistEnv(rank=0, world_size=1, local_rank=3).start(None)


def test_bad_parallel_setting_and_environment(monkeypatch):
    with pytest.raises(TrainingError, match="parallel 'zero3' is not one of"):
        TrainConfig(parallel="zero3")
    with pytest.raises(TrainingError, match="forward_mode 'multipass' with parallel: fsdp is not supported"):
        TrainConfig(parallel="fsdp", forward_mode="multipass")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DistributedError, match="WORLD_SIZE='two' is not an integer"):
        DistEnv.from_environment()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DistributedError, match="RANK=2 is outside WORLD_SIZE=2"):
        DistEnv.from_environment()


# -- dropout under DDP ------------------------------------------------------------------------------

def _rank_dropout_masks(rank: int, world: int, port: int, values: dict, out: str) -> None:
    """Train `values` on this rank; save the first dropout masks and attention-dropout seeds it drew."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import coconut_engine.model as model_module

    masks, plain = [], model_module._dropout

    def recording(x, p):
        y = plain(x, p)
        if p > 0 and len(masks) < 4:
            masks.append((y == 0).flatten()[:256].clone())
        return y

    seeds, draw = [], model_module.Decoder.attention_dropout_seed

    def recording_seed(self):
        seed = draw(self)
        if seed is not None and len(seeds) < 4:
            seeds.append(seed)
        return seed

    model_module._dropout = recording
    model_module.Decoder.attention_dropout_seed = recording_seed
    trainer = Trainer(TrainConfig(**values))
    trainer.run()
    torch.save((masks, seeds), Path(out) / f"masks{rank}.pt")
    del trainer
    leave_process_group()


def test_ddp_ranks_draw_their_own_dropout_masks(runs, tmp_path):
    """Each rank trains on other samples: with one seed for all ranks, every rank drew the same masks
    (the global batch saw one rank's dropout noise N times over)."""
    values = config(tmp_path / "run", runs["root"] / "single", num_epochs=1, dropout=0.5,
                    gradient_accumulation_steps=1)
    spawn_ranks(_rank_dropout_masks, (2, _free_port(), values, str(tmp_path)), nprocs=2)
    (first, first_seeds), (second, second_seeds) = (torch.load(tmp_path / f"masks{r}.pt") for r in range(2))
    assert len(first) == len(second) == 4
    assert all(a.any() for a in first)
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    # attention dropout (the config's dropout covers it): each rank's forwards draw their own mask seeds
    assert len(first_seeds) == len(second_seeds) >= 2
    assert set(first_seeds).isdisjoint(second_seeds)


def test_cli_train_destroys_the_process_group_before_exit(tmp_path, monkeypatch):
    """Under torchrun the CLI leaves the process group before the interpreter exits: left to exit, gloo's
    clean-up aborted a finished 2-rank fsdp run now and then (SIGABRT, torchrun reports a failure)."""
    import coconut_engine.trainer as trainer_module
    from coconut_engine import cli

    monkeypatch.setattr(trainer_module, "train", lambda config: [])
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=torch.distributed.HashStore())
    try:
        assert cli.main(["train", "--save_dir", str(tmp_path / "run")]) == 0
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
