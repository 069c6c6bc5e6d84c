"""Two gloo processes sample with different workloads (rank 0: three problems in three batches, rank 1: one problem,
rows that stop early at different times): no hang, the same number of model forwards on both ranks (what keeps FSDP
all-gathers in step), and the same dialogues as each rank sampling alone."""

import os
import pickle

import pytest
import torch
import torch.multiprocessing as mp

TIMEOUT_S = 240


def _setup(rank: int):
    from test_rollout import _make_model, _stop_id, _tokenizer

    from exgrpo_fast.data.tasks import builtin_dataset

    tokenizer = _tokenizer()
    model = _make_model("llama", len(tokenizer), _stop_id(tokenizer), stop_scale=4.0)
    problems = list(builtin_dataset(6, 2, seed=0)["train"])
    mine = problems[:3] if rank == 0 else problems[3:4]
    return model, tokenizer, mine


def _sample(model, tokenizer, problems, rank: int):
    from exgrpo_fast.rollout import SamplingParams, rollout_dialogues

    forwards = []
    # every model forward starts at the input embedding (in the transformers forward and the lean one alike)
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda *_: forwards.append(1))
    params = SamplingParams(temperature=1.0, max_new_tokens=16, stop_check_every=2)
    rs = rollout_dialogues(model, tokenizer, problems, group_size=2, params=params, batch_size=2,
                           generator=torch.Generator().manual_seed(100 + rank))  # fmt: skip
    hook.remove()
    return len(forwards), [r.ids for r in rs], [len(s) for r in rs for s in r.responses]


def _worker(rank: int, world: int, tmp: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    model, tokenizer, mine = _setup(rank)
    solo = _sample(model, tokenizer, mine, rank)  # before the process group exists: no agreement
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        together = _sample(model, tokenizer, mine, rank)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(tmp, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump({"solo": solo, "together": together}, f)


@pytest.mark.slow
def test_ranks_agree_on_forwards(tmp_path):
    ctx = mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    try:
        import time

        deadline = time.monotonic() + TIMEOUT_S
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"ranks did not finish within {TIMEOUT_S} s (deadlock?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = [pickle.load(open(tmp_path / f"rank{r}.pkl", "rb")) for r in range(2)]
    solo_forwards = [o["solo"][0] for o in out]
    together_forwards = [o["together"][0] for o in out]
    print("forwards alone:", solo_forwards, "together:", together_forwards)
    assert solo_forwards[0] != solo_forwards[1]  # the workloads really differ
    assert together_forwards[0] == together_forwards[1]
    assert together_forwards[0] >= max(solo_forwards)
    for o in out:  # agreeing on stops changes how long ranks wait, never what they sample
        assert o["together"][1:] == o["solo"][1:]
    lengths = [n for o in out for n in o["solo"][2]]
    assert min(lengths) < 16 and max(lengths) == 16  # some turns stop early, some run to max_new_tokens
