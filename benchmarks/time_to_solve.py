"""Steps and seconds to solve the reference task (99% held-out exact-match): tinyattn vs a PyTorch twin.

    python benchmarks/time_to_solve.py [--max-steps 1500 --skip-torch]

Both sides train train.py's default run (tinyattn's is models.training.Run itself, its step
splitting the batch into shards that run side by side): the same initial weights, the
same batches from the same seeded stream, Adam lr 3e-3 with 100 warm-up steps and cosine decay over 1500
(tinyattn.optim.WarmupCosine; the twin a LambdaLR of the same curve). Every 100 steps
each greedy-decodes the 512 held-out sequences of tinyattn.tasks' eval_set and stops
once its exact-match reaches 99%. The sides take turns 100 steps at a time in one
process, with an untimed pause between turns so one side's idle BLAS / OpenMP threads do
not spin against the other (see step_time.py). tinyattn decodes with its key/value
cache, the twin without one, so training seconds are reported apart from the total.
Writes benchmarks/results/time_to_solve.json.
"""
import argparse
import time

import common
from tinyattn.tasks import EOS

PAUSE_S = 0.25


def exact_match(rows, batches):
    right = sum(row == target + [EOS] for batch, rows_of in zip(batches, rows) for row, target in zip(rows_of, batch.targets))
    return right / sum(len(batch) for batch in batches)


class Side:
    """One framework's run: trains `count` steps at a time, evaluates, keeps the clock."""

    def __init__(self, name):
        self.name, self.step, self.train_s, self.eval_s = name, 0, 0.0, 0.0
        self.history, self.solved_at, self.last_loss = [], None, None

    def advance(self, count):
        start = time.perf_counter()
        for _ in range(count):
            self.last_loss = self.train_step()
        self.train_s += time.perf_counter() - start
        self.step += count

    def train_step(self):
        """One optimizer and schedule step on the next batch."""
        loss = self.loss(next(self.stream))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        return loss.item()

    def evaluate(self, target):
        start = time.perf_counter()
        accuracy = self.exact_match()
        self.eval_s += time.perf_counter() - start
        self.history.append({"step": self.step, "exact_match": accuracy, "loss": self.last_loss,
                             "train_s": round(self.train_s, 3), "wall_s": round(self.train_s + self.eval_s, 3)})
        print(f"  {self.name:<8} step {self.step:5d}  loss {self.last_loss:.4f}  exact-match {accuracy:.3f}  "
              f"train {self.train_s:.1f}s  total {self.train_s + self.eval_s:.1f}s", flush=True)
        if accuracy >= target and self.solved_at is None:
            self.solved_at = self.history[-1]


class TinyattnSide(Side):
    def __init__(self, config, task, eval_batches):
        super().__init__("tinyattn")
        self.task, self.eval_batches = task, eval_batches
        self.run = common.train_run(config)
        self.model = self.run.model

    def train_step(self):
        return self.run.train_step()[0]

    def exact_match(self):
        self.model.eval()
        rows = [self.model.greedy_decode(batch.source, self.task.max_len + 1)[0] for batch in self.eval_batches]
        self.model.train()
        return exact_match(rows, self.eval_batches)


class TorchSide(Side):
    def __init__(self, torch, config, task, eval_batches, initial_model):
        from twin import Seq2SeqTwin, batch_tensors, warmup_cosine_factor
        super().__init__("torch")
        self.task, self.eval_batches, self.to_torch = task, eval_batches, batch_tensors
        self.model = Seq2SeqTwin.from_tinyattn(initial_model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine_factor(config.warmup, config.steps))
        self.stream = task.batches(config.batch_size, config.seed)
        self.eval_sources = [batch_tensors(batch)[0] for batch in eval_batches]

    def loss(self, batch):
        return self.model.loss(*self.to_torch(batch))

    def exact_match(self):
        rows = [self.model.greedy_decode(source, self.task.max_len + 1) for source in self.eval_sources]
        return exact_match(rows, self.eval_batches)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=1500, help="give up after this many steps (default 1500)")
    parser.add_argument("--skip-torch", action="store_true", help="train tinyattn only")
    common.add_out_argument(parser, "time_to_solve")
    args = parser.parse_args()
    torch = common.torch_or_none(args.skip_torch)
    machine = common.start()
    config = common.REFERENCE
    task = common.task_for(config)
    eval_batches = task.eval_set(config.eval_size, config.seed, batch_size=512)
    sides = [TinyattnSide(config, task, eval_batches)]
    if torch is not None:
        sides.append(TorchSide(torch, config, task, eval_batches, sides[0].model))  # built before any step: same weights
    target, every = config.target_accuracy, config.eval_every
    print(f"training to {target:.0%} exact-match on {config.eval_size} held-out sequences, "
          f"evaluating every {every} steps, at most {args.max_steps} steps", flush=True)
    for turn in range(-(-args.max_steps // every)):
        running = [side for side in sides if side.solved_at is None]
        if not running:
            break
        for side in (running if turn % 2 == 0 else running[::-1]):
            if len(running) > 1:
                time.sleep(PAUSE_S)
            side.advance(min(every, args.max_steps - side.step))
            side.evaluate(target)

    figures = {}
    for side in sides:
        solved = side.solved_at
        figures[side.name] = {"solved": solved is not None, "steps": solved and solved["step"],
                              "wall_s": solved and solved["wall_s"], "train_s": solved and solved["train_s"],
                              "final_exact_match": side.history[-1]["exact_match"], "history": side.history,
                              "train_ms_per_step": 1e3 * side.train_s / side.step}
    both = torch is not None and all(figures[name]["solved"] for name in ("tinyattn", "torch"))
    if both:
        figures["ratio_tinyattn_over_torch"] = {key: figures["tinyattn"][key] / figures["torch"][key]
                                                for key in ("steps", "wall_s", "train_s", "train_ms_per_step")}
    settings = {"config": config.to_dict(), "tinyattn_threads": sides[0].run.sharded.shards, "max_steps": args.max_steps, "pause_between_turns_s": PAUSE_S,
                "schedule": "WarmupCosine(warmup 100, total 1500); torch: LambdaLR of the same curve",
                "evaluation": "greedy decoding of 512 held-out sequences (tinyattn with KV cache, torch without)",
                "torch": torch is not None}
    common.write_results("time_to_solve", machine, settings, figures, args.out)

    print(f"\ntime to {target:.0%} held-out exact-match, reference config (reverse, vocab 10, lengths 1..16)")
    rows = []
    for side in sides:
        f = figures[side.name]
        if f["solved"]:
            rows.append([side.name, f["steps"], f"{f['wall_s']:.1f}", f"{f['train_s']:.1f}", f"{f['train_ms_per_step']:.1f}"])
        else:
            rows.append([side.name, f"not in {side.step}", "-", "-", f"{f['train_ms_per_step']:.1f}"])
    if both:
        r = figures["ratio_tinyattn_over_torch"]
        rows.append(["tinyattn / torch", f"{r['steps']:.2f}", f"{r['wall_s']:.2f}", f"{r['train_s']:.2f}", f"{r['train_ms_per_step']:.2f}"])
    common.table(["side", "steps", "wall s", "training s", "train ms/step"], rows)


if __name__ == "__main__":
    main()
