"""Data parallelism on the CPU (gloo, 2 processes): DDP, the Trainer under accelerate, FSDP2 fully_shard.

Every rank takes two rows of one four-row batch whose ranks predict different numbers of tokens; the
gradient every rank ends with must be the single-process gradient of the whole batch.
Processes start from a forkserver that has imported this module: fast, and never forked from a process
whose OpenMP threads have run (a fork from the test process can hang there).
"""
import os

import pytest
import torch

from fastmtt.objective import MTTObjective
from fastmtt.reduction import MTTOutput
from fastmtt.trainer import MTTTrainer
from tests.test_objective import tiny_peft, trainable_grads
from tests.test_trainer import LR, adapter_weights, dataset_of, four_examples, training_args
from tests.utils import WORLD, close_gloo, init_gloo, launch_gloo

transformers = pytest.importorskip("transformers")

LAM = 0.7
BUDGET_RATIO = 1.1  # target_kl = the whole batch's KL / BUDGET_RATIO: with horizon 1, one step moves lam to LAM * 1.1
fsdp = pytest.importorskip("torch.distributed.fsdp")


def rank_rows(batch, rank):
    rows = slice(2 * rank, 2 * rank + 2)
    return {key: value[rows] for key, value in batch.items()}


def predicted_tokens(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


def whole_batch_reference(device="cpu"):
    """(MTTOutput, LoRA gradients) of the whole batch in one process (on `device`), as CPU tensors."""
    batch = four_examples()
    assert predicted_tokens(rank_rows(batch, 0)) != predicted_tokens(rank_rows(batch, 1))
    model = tiny_peft().to(device)
    output = MTTObjective(lam=LAM)(model, **{key: value.to(device) for key, value in batch.items()})
    output.loss.backward()
    return MTTOutput(*(t.cpu() for t in output)), {name: g.cpu() for name, g in trainable_grads(model).items()}


def ddp_worker(rank, rendezvous, out_dir, device="cpu"):
    """device "cpu": gloo; "cuda": NCCL, one GPU per rank."""
    init_gloo(rank, rendezvous, "gloo" if device == "cpu" else "nccl")
    device = torch.device(device, rank) if device == "cuda" else torch.device(device)
    device_ids = [rank] if device.type == "cuda" else None
    model = torch.nn.parallel.DistributedDataParallel(tiny_peft().to(device), device_ids=device_ids)
    batch = {key: value.to(device) for key, value in rank_rows(four_examples(), rank).items()}
    output = MTTObjective(lam=LAM)(model, **batch)
    output.loss.backward()
    grads = {name: grad.cpu() for name, grad in trainable_grads(model.module).items()}
    budget_lams = []  # lam moves by the global step's divergence, alike on every rank, whatever the token averaging
    target_kl = float(whole_batch_reference()[0].kl) / BUDGET_RATIO
    for data_parallel_size in (None, 1):
        budgeted = MTTObjective(lam=LAM, target_kl=target_kl, kl_horizon=1.0)
        budgeted(model, **batch, data_parallel_size=data_parallel_size).loss.backward()
        budget_lams.append(budgeted.end_step())
    torch.save(dict(output=[t.detach().cpu() for t in output], grads=grads, budget_lams=budget_lams),
               f"{out_dir}/rank{rank}.pt")
    del model, output
    close_gloo()


def fsdp2_worker(rank, rendezvous, out_dir):
    init_gloo(rank, rendezvous)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    model = tiny_peft()
    for layer in model.get_base_model().model.layers:
        fsdp.fully_shard(layer, mesh=mesh)
    fsdp.fully_shard(model, mesh=mesh)
    output = MTTObjective(lam=LAM)(model, **rank_rows(four_examples(), rank))
    output.loss.backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.requires_grad}

    head_apart = tiny_peft()  # the head sharded on its own is still sharded inside the root's forward
    fsdp.fully_shard(head_apart.get_base_model().lm_head, mesh=mesh)
    fsdp.fully_shard(head_apart, mesh=mesh)
    with pytest.raises(ValueError, match="output head's weight is sharded"):
        MTTObjective(lam=LAM)(head_apart, **rank_rows(four_examples(), rank))
    torch.save(dict(output=[t.detach() for t in output], grads=grads), f"{out_dir}/rank{rank}.pt")
    close_gloo()


def assert_global_batch_results(results, device="cpu", rtol=1e-5, atol=1e-7):
    want, want_grads = whole_batch_reference(device)
    assert want.kl > 1e-3
    for rank, result in enumerate(results):
        assert result["grads"].keys() == want_grads.keys()
        assert any("lm_head" in name for name in want_grads)
        for name, grad in want_grads.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(result["grads"][name], grad, rtol=rtol, atol=atol, msg=f"rank {rank} {name}")
    # Each rank returns world_size * its share of the global sum: the mean over ranks is the global value.
    for index, name in enumerate(("loss", "ce", "kl")):
        mean = sum(result["output"][index] for result in results) / WORLD
        torch.testing.assert_close(mean, getattr(want, name).detach(), rtol=rtol, atol=atol, msg=name)


def test_ddp_gradients_equal_the_whole_batch_gradient(tmp_path):
    results = launch_gloo(ddp_worker, tmp_path)
    assert_global_batch_results(results)
    for result in results:  # the global count (default) and each rank's own mean (data_parallel_size=1)
        assert result["budget_lams"] == pytest.approx([LAM * BUDGET_RATIO] * 2, rel=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"NCCL needs {WORLD} GPUs (one per rank)")
def test_ddp_nccl_gradients_equal_the_whole_batch_gradient(tmp_path):
    assert_global_batch_results(launch_gloo(ddp_worker, tmp_path, "cuda"), "cuda", rtol=1e-4, atol=1e-6)


def test_fsdp2_fully_shard_gradients_equal_the_whole_batch_gradient(tmp_path):
    assert_global_batch_results(launch_gloo(fsdp2_worker, tmp_path))


class RecordingTrainer(MTTTrainer):
    """MTTTrainer that keeps the input_ids of the micro-batches this process trained on."""

    seen = None

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.seen is not None:
            self.seen.append(inputs["input_ids"])
        return super().compute_loss(model, inputs, *args, **kwargs)


def trainer_worker(rank, rendezvous, out_dir, average_tokens):
    """MTTTrainer in accelerate's multi-process CPU mode, set up as accelerate.debug_launcher does."""
    os.environ.update(WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", ACCELERATE_USE_CPU="yes",
                      ACCELERATE_MIXED_PRECISION="no", GLOO_SOCKET_IFNAME="lo")
    init_gloo(rank, rendezvous)
    model = tiny_peft()
    args = training_args(out_dir, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                         average_tokens_across_devices=average_tokens)
    target_kl = float(whole_batch_reference()[0].kl) / BUDGET_RATIO
    trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset_of(four_examples()), mtt_lambda=LAM,
                               mtt_target_kl=target_kl, mtt_kl_horizon=1.0)
    assert trainer.accelerator.num_processes == WORLD and trainer.accelerator.distributed_type == "MULTI_CPU"
    evaluator = MTTTrainer(model=tiny_peft(), args=args, mtt_lambda=LAM)  # evaluates unwrapped, counts over processes
    evaluation = evaluator.evaluate(dataset_of(four_examples()))
    trainer.seen = []
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    torch.save(dict(weights=adapter_weights(model), log=trainer.state.log_history, seen=trainer.seen,
                    eval_loss=evaluation["eval_loss"], lam=trainer.objective.options.lam), f"{out_dir}/rank{rank}.pt")
    close_gloo()


def mean_of_rank_means(rows_by_rank):
    """(ce, kl, LoRA gradients) averaged over ranks of each rank's own token mean (no token count across ranks)."""
    batch, ce, kl, grads = four_examples(), 0.0, 0.0, {}
    for rows in rows_by_rank:
        model = tiny_peft()
        output = MTTObjective(lam=LAM)(model, **{key: value[rows] for key, value in batch.items()})
        output.loss.backward()
        ce, kl = ce + float(output.ce) / WORLD, kl + float(output.kl) / WORLD
        for name, grad in trainable_grads(model).items():
            grads[name] = grads.get(name, 0.0) + grad / WORLD
    return ce, kl, grads


@pytest.mark.parametrize("average_tokens", [True, False])
def test_trainer_step_under_accelerate_multi_process_cpu(tmp_path, average_tokens):
    """average_tokens_across_devices (the default): the step of the whole batch; without it, as the
    Trainer does for CE, the mean over processes of each process's token mean. Either way a forgetting
    budget moves lam on every rank by the whole step's KL (all-reduced): target_kl = that KL / 1.1, horizon 1."""
    results = launch_gloo(trainer_worker, tmp_path, average_tokens)
    batch = four_examples()
    rows_by_rank = [[i for seen in result["seen"] for ids in seen for i, row in enumerate(batch["input_ids"])
                     if torch.equal(ids, row)] for result in results]
    assert sorted(sum(rows_by_rank, [])) == [0, 1, 2, 3]
    if average_tokens:
        want, want_grads = whole_batch_reference()
        want_ce, want_kl = float(want.ce), float(want.kl)
        for result in results:
            assert result["eval_loss"] == pytest.approx(float(want.loss), rel=1e-5)
    else:
        want_ce, want_kl, want_grads = mean_of_rank_means(rows_by_rank)
        assert abs(want_ce - float(whole_batch_reference()[0].ce)) > 1e-3  # the two cases differ
    start = adapter_weights(tiny_peft())
    for result in results:
        for name, grad in want_grads.items():
            torch.testing.assert_close(result["weights"][name], start[name] - LR * grad, rtol=1e-5, atol=1e-6,
                                       msg=name)
        (logged,) = [entry for entry in result["log"] if "kl" in entry]
        assert logged["ce"] == pytest.approx(want_ce, rel=1e-5)
        assert logged["kl"] == pytest.approx(want_kl, rel=1e-5)
        assert result["lam"] == pytest.approx(LAM * BUDGET_RATIO, rel=1e-6)
