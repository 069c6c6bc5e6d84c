"""A whole GRPO step, ours vs TRL's GRPOTrainer, on the same model, prompts, group size, lengths and optimizer.

Both trainers start from the same checkpoint and get the same problems (P per step, G samples each), the same
max completion length, sampling (temperature 1, top-p 1), reward, advantages (group-normalised), clipped surrogate
(epsilon 0.2, token-mean aggregation, on-policy: one update per batch, no KL), AdamW (lr, betas 0.9/0.999, no weight
decay, constant lr, grad-norm clip 1.0). The reward is the task's answer check plus a shaped term (the fraction of
digits in the answer) that a randomly initialised model can learn within a few steps, so the printed reward and
loss trends show both trainers are really training.

    ours        the pieces train.grpo_step runs, composed here with this bench's reward and optimizer:
                rollout_dialogues (single turn) -> rewards -> ops.group_advantages -> data.packing.pack_sequences
                (groups: each problem's prompt packed once, grpo.share_prefix) -> model.forward.packed_hidden ->
                ops.fused_linear_policy_loss (on-policy, old_logp=None, the step's LossNorm) -> backward -> AdamW
    ours-noshare  the same with every sample packed whole (grpo.share_prefix false)
    trl         trl.GRPOTrainer with transformers generation (its default without vLLM), loss_type "dapo"
                (token-mean), beta 0, num_iterations 1
    ours-3turn  our multi-turn ExGRPO step (question + 2 probes per dialogue) at the same P, G and length per turn

Reported per trainer: seconds per step (mean over steps after the first), rollout tokens/s (sampled tokens /
sampling time), trained tokens/s (prompt + completion tokens of every sample, the work the step stands for, / whole
step time), the update's seconds and the tokens it computes per step (through the policy forward and backward:
fewer than the trained tokens with a shared prefix), reward and loss per step.

Then a long-prompt workload (few-shot context: prompt ~512 tokens, completion 64, G 16), ours with and without
sharing, where the prompt dominates the tokens and sharing pays most (--long-prompt 0 skips it).

    python benches/bench_e2e.py                    # CPU: tiny preset, P 4, G 8, 32 new tokens, 6 steps; long prompt
    python benches/bench_e2e.py --preset gpu-0.5b --problems 16 --group-size 8 --max-new-tokens 256   # GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benches._common import env_facts, model_setup, rel, sync, write_csv  # noqa: E402
from exgrpo_fast import ops  # noqa: E402
from exgrpo_fast.data.dialogue import end_of_turn_ids  # noqa: E402
from exgrpo_fast.data.packing import pack_sequences  # noqa: E402
from exgrpo_fast.data.tasks import builtin_dataset, rollout_user_turns  # noqa: E402
from exgrpo_fast.model.forward import packed_hidden  # noqa: E402
from exgrpo_fast.model.loading import lm_head, load_model  # noqa: E402
from exgrpo_fast.model.tiny import create_tiny_checkpoint  # noqa: E402
from exgrpo_fast.rewards import score_dialogue  # noqa: E402
from exgrpo_fast.rollout import SamplingParams, rollout_dialogues  # noqa: E402
from exgrpo_fast.train import step_loss_norm  # noqa: E402

EPS_CLIP = 0.2


def shaped_reward(problem, responses: list[str]) -> float:
    """Task reward (answer and probes, exgrpo_fast.rewards) + the mean fraction of digit characters per answer."""
    digits = [sum(c.isdigit() for c in r) / max(1, len(r)) for r in responses]
    return float(score_dialogue(problem, responses)["total"]) + sum(digits) / max(1, len(digits))


def make_problems(n: int, seed: int, prompt_len: int = 0) -> list:
    """Problems with at least 3 user turns (question + 2 probes), probes cut to 2 for the 3-turn mode. prompt_len > 0
    puts worked examples (other problems with their answers: a few-shot context, the same for every problem) before
    each question, up to about prompt_len characters (= tokens of the tiny tokenizer) in all."""
    out, k = [], 0
    while len(out) < n:
        for p in builtin_dataset(4 * n, 2, seed=seed + k)["train"]:
            if len(rollout_user_turns(p)) >= 3 and len(out) < n:
                q = dict(p)
                q["probes"] = [x for x in p["probes"] if x["kind"] != "explain"][:2]
                out.append(q)
        k += 1
    if prompt_len > 0:
        shots = builtin_dataset(64, 2, seed=seed + 1000)["train"]
        context = ""
        for p in shots:
            shot = f"Q: {p['question']} A: {p['rationale']} {p['answer']}\n"
            if len(context) + len(shot) + max(len(q["question"]) for q in out) + 3 > prompt_len:
                break
            context += shot
        out = [{**q, "question": context + q["question"]} for q in out]
    return out


# ----------------------------------------------------------------------------------------------------------------
# ours


def our_step(model, tok, optimizer, problems, args, include_probes: bool, step: int, share: bool = True) -> dict:
    device = next(model.parameters()).device
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    G = args.group_size
    sync(device)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(step)
    rollouts = rollout_dialogues(model, tok, problems, group_size=G, params=params, include_probes=include_probes,
                                 batch_size=len(problems) * G, generator=gen)  # fmt: skip
    sync(device)
    t_roll = time.perf_counter() - t0
    rewards = torch.tensor([shaped_reward(problems[r.problem_index], r.responses) for r in rollouts])
    group_ids = torch.tensor([r.problem_index for r in rollouts])
    advantages = ops.group_advantages(rewards, group_ids, scale="group").to(device)  # (S,)
    groups = [r.problem_index for r in rollouts] if share else None  # the trainer's grpo.share_prefix
    packed = pack_sequences([(r.ids, r.loss_mask) for r in rollouts], args.token_budget, groups=groups)
    batches = [b.to(device) for b in packed]
    cfg = ops.LossConfig(loss_type="ppo", clip_low=EPS_CLIP, clip_high=EPS_CLIP, loss_agg="token-mean")
    norm = step_loss_norm(batches)  # the whole step's normaliser, as the trainer computes it
    loss_sum = torch.zeros((), device=device)
    sync(device)
    t_update = time.perf_counter()
    for b in batches:
        hidden = packed_hidden(model, b)  # (N, H)
        weight, bias = lm_head(model)
        mask = torch.ones_like(b.loss_labels, dtype=torch.bool)
        # on-policy (old_logp=None): ratio 1 on the detached current log-probs, no extra LM-head pass
        loss, _ = ops.fused_linear_policy_loss(hidden, weight, b.loss_labels, None, advantages[b.sample_index],
                                               b.loss_seq_ids, mask, bias=bias, cfg=cfg, norm=norm)  # fmt: skip
        loss.backward()  # each micro-batch's loss is its share of the step's
        loss_sum += loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    t_end = time.perf_counter()
    return {
        "seconds": t_end - t0, "rollout_seconds": t_roll, "rollout_tokens": sum(sum(r.loss_mask) for r in rollouts),
        "trained_tokens": sum(len(r.ids) for r in rollouts), "update_tokens": sum(b.num_tokens for b in packed),
        "update_seconds": t_end - t_update, "reward": rewards.mean().item(), "loss": loss_sum.item(),
    }  # fmt: skip


def run_ours(path, problems_per_step, args, include_probes: bool, device, dtype, share: bool = True) -> list[dict]:
    model, tok = load_model(path, dtype=dtype, device=device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    return [
        our_step(model, tok, optimizer, probs, args, include_probes, s, share)
        for s, probs in enumerate(problems_per_step)
    ]


# ----------------------------------------------------------------------------------------------------------------
# TRL


def run_trl(path, problems_per_step, args, device, dtype) -> list[dict]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    flat = [p for probs in problems_per_step for p in probs]
    by_question = {p["question"]: p for p in flat}
    ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p["question"]}]} for p in flat])
    P, G = len(problems_per_step[0]), args.group_size
    rollout_tokens: list[int] = []
    gen_seconds: list[float] = []

    def reward_fn(prompts, completions, completion_ids=None, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rollout_tokens.append(sum(len(x) for x in completion_ids) if completion_ids is not None else 0)
        return [shaped_reward(by_question[p[-1]["content"]], [t]) for p, t in zip(prompts, texts)]

    original_generate = model.generate

    def timed_generate(*a, **kw):
        sync(device)
        t0 = time.perf_counter()
        out = original_generate(*a, **kw)
        sync(device)
        gen_seconds.append(time.perf_counter() - t0)
        return out

    model.generate = timed_generate
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            sync(device)
            step_times.append(time.perf_counter() - self.t0)

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=P * G, num_generations=G,
        generation_batch_size=P * G, gradient_accumulation_steps=1,
        max_completion_length=args.max_new_tokens, max_steps=len(problems_per_step), learning_rate=args.lr,
        adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, beta=0.0, epsilon=EPS_CLIP, loss_type="dapo", scale_rewards="group", num_iterations=1,
        temperature=1.0, top_p=1.0, top_k=0, shuffle_dataset=False, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16, seed=0,
        generation_kwargs={"eos_token_id": end_of_turn_ids(tok)}, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_fn], args=config, train_dataset=ds,
                          processing_class=tok, callbacks=[Timer()])  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    out = []
    seen = [0.0] + [float(h["num_tokens"]) for h in logs]  # TRL's running count of prompt + completion tokens
    for i, secs in enumerate(step_times):
        log = logs[i] if i < len(logs) else {}
        out.append({
            "seconds": secs, "rollout_seconds": gen_seconds[i] if i < len(gen_seconds) else float("nan"),
            "rollout_tokens": rollout_tokens[i] if i < len(rollout_tokens) else 0,
            "trained_tokens": seen[i + 1] - seen[i] if i + 1 < len(seen) else 0,
            "reward": float(log.get("reward", "nan")), "loss": float(log.get("loss", "nan")),
        })  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------


def summarize(name: str, steps: list[dict]) -> dict:
    timed = steps[1:] if len(steps) > 1 else steps  # the first step carries one-off set-up costs
    secs = statistics.mean(s["seconds"] for s in timed)
    roll = sum(s["rollout_tokens"] for s in timed) / sum(s["rollout_seconds"] for s in timed)
    trained = sum(s["trained_tokens"] for s in timed) / sum(s["seconds"] for s in timed)
    out = {"trainer": name, "s_per_step": round(secs, 3), "rollout_tok_s": round(roll, 1),
           "trained_tok_s": round(trained, 1),
           "trained_tokens_per_step": statistics.mean(s["trained_tokens"] for s in timed),
           "first_reward": steps[0]["reward"], "last_reward": steps[-1]["reward"], "steps": len(steps)}  # fmt: skip
    line = f"{name:>18} | {secs:6.2f} s/step | rollout {roll:7.0f} tok/s | trained {trained:7.0f} tok/s"
    if "update_seconds" in steps[0]:
        out["update_s_per_step"] = round(statistics.mean(s["update_seconds"] for s in timed), 3)
        out["update_tokens_per_step"] = statistics.mean(s["update_tokens"] for s in timed)
        line += f" | update {out['update_s_per_step']:6.3f} s, {out['update_tokens_per_step']:7.0f} tokens/step"
    print(line)
    print(f"{'':>18} | reward per step: " + " ".join(f"{s['reward']:.3f}" for s in steps))
    print(f"{'':>18} | loss per step:   " + " ".join(f"{s['loss']:+.4f}" for s in steps))
    return out


def compare_sharing(results: dict, a: str, b: str) -> None:
    """One line: the update and the step with a shared prefix (a) against without (b), on the same work."""
    if a in results and b in results:
        x, y = results[a], results[b]
        print(f"{a} / {b}: update tokens x{y['update_tokens_per_step'] / x['update_tokens_per_step']:.2f} fewer, "
              f"update x{y['update_s_per_step'] / x['update_s_per_step']:.2f} faster, "
              f"step x{y['s_per_step'] / x['s_per_step']:.2f} faster")  # fmt: skip


def run_trainer(name: str, path, per_step, args, device, dtype):
    if name in ("ours", "ours-noshare", "ours-3turn", "ours-3turn-noshare"):
        return run_ours(path, per_step, args, "3turn" in name, device, dtype, share=not name.endswith("noshare"))
    if name == "trl":
        return run_trl(path, per_step, args, device, dtype)
    raise SystemExit(f"unknown trainer {name!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="tiny (CPU default) or gpu-0.5b (GPU default)")
    p.add_argument("--problems", type=int, default=4, help="problems per step (P)")
    p.add_argument("--group-size", type=int, default=8, help="samples per problem (G)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--token-budget", type=int, default=4096)
    p.add_argument("--trainers", nargs="+", default=["ours", "ours-noshare", "trl", "ours-3turn"])
    p.add_argument("--long-prompt", type=int, default=512, help="prompt tokens of the long-prompt workload (0: skip)")
    p.add_argument("--long-new-tokens", type=int, default=64, help="completion tokens of the long-prompt workload")
    p.add_argument("--long-group-size", type=int, default=16, help="G of the long-prompt workload")
    p.add_argument("--long-problems", type=int, default=2, help="P of the long-prompt workload")
    p.add_argument("--long-steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    device, preset, dtype = model_setup(args.preset, args.threads)
    path = create_tiny_checkpoint(Path(tempfile.mkdtemp()) / preset, preset=preset, seed=0)
    facts = env_facts(device)
    rows = []

    def workload(name: str, wargs, prompt_len: int, trainers: list[str]) -> dict:
        problems = make_problems(wargs.problems * wargs.steps, seed=0, prompt_len=prompt_len)
        per_step = [problems[i * wargs.problems : (i + 1) * wargs.problems] for i in range(wargs.steps)]
        print(f"# {name} | {facts['device']} | torch {facts['torch']} | threads {torch.get_num_threads()} | "
              f"load {os.getloadavg()[0]:.2f} | preset {preset} | P {wargs.problems} G {wargs.group_size} | "
              f"prompt ~{statistics.mean(len(q['question']) for q in problems):.0f} chars | max_new_tokens "
              f"{wargs.max_new_tokens} | steps {wargs.steps} | lr {wargs.lr}")  # fmt: skip
        results = {}
        for trainer in trainers:
            torch.manual_seed(0)
            try:
                steps = run_trainer(trainer, path, per_step, wargs, device, dtype)
            except Exception as err:  # report exactly why a peer could not run here, and go on with ours
                if trainer != "trl":
                    raise
                print(f"{'trl':>18} | could not run: {type(err).__name__}: {err}")
                continue
            results[trainer] = summarize(trainer, steps)
            rows.append({**facts, "workload": name, "preset": preset, "P": wargs.problems, "G": wargs.group_size,
                         "max_new_tokens": wargs.max_new_tokens, **results[trainer]})  # fmt: skip
        return results

    results = workload("default", args, 0, args.trainers)
    if "ours" in results and "trl" in results:
        a, b = results["ours"], results["trl"]
        speed = b["s_per_step"] / a["s_per_step"]
        roll = a["rollout_tok_s"] / b["rollout_tok_s"]
        trained = a["trained_tok_s"] / b["trained_tok_s"]
        print(f"ours / trl: step throughput x{speed:.2f}, rollout tok/s x{roll:.2f}, trained tok/s x{trained:.2f}")
    compare_sharing(results, "ours", "ours-noshare")
    if args.long_prompt > 0:
        long_args = argparse.Namespace(**{**vars(args), "problems": args.long_problems, "steps": args.long_steps,
                                          "group_size": args.long_group_size,
                                          "max_new_tokens": args.long_new_tokens})  # fmt: skip
        results = workload("long-prompt", long_args, args.long_prompt, ["ours", "ours-noshare"])
        compare_sharing(results, "ours", "ours-noshare")
    print(f"wrote {rel(write_csv('bench_e2e', rows))}")


if __name__ == "__main__":
    main()
