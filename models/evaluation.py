"""What a trained model does on held-out data: exact-match, token accuracy, by length, samples, and one decode drawn."""
from tinyattn import backend
from tinyattn.tasks import EOS, describe
from tinyattn.viz import attention_svg, heatmap_text

SAMPLES_SHOWN = 5
ATTENTION_KINDS = {"transformer": "cross-attention", "gpt": "attention on the source", "rnn-attention": "additive attention"}


def evaluate(model, task, batches):
    """Greedy-decode held-out batches: exact-match (EOS included), token accuracy, the same
    for each source length, and some samples."""
    model.eval()
    by_length = {}  # source length -> [sequences, exactly right, right tokens, tokens]
    samples = []
    for batch in batches:
        predictions, _ = model.greedy_decode(batch.source, task.max_len + 1)
        for source, target, predicted in zip(batch.sources, batch.targets, predictions):
            expected = target + [EOS]
            counts = by_length.setdefault(len(source), [0, 0, 0, 0])
            counts[0] += 1
            counts[1] += predicted == expected
            counts[2] += sum(p == e for p, e in zip(predicted, expected))
            counts[3] += len(expected)
            if len(samples) < SAMPLES_SHOWN:
                samples.append((source, predicted, predicted == expected))
    model.train()
    totals = [sum(column) for column in zip(*by_length.values())]
    return {"exact_match": totals[1] / totals[0], "token_accuracy": totals[2] / totals[3], "sequences": totals[0],
            "samples": samples,
            "by_length": {length: {"sequences": n, "exact_match": right / n, "token_accuracy": tokens_right / tokens}
                          for length, (n, right, tokens_right, tokens) in sorted(by_length.items())}}


def show_by_length(result):
    print("source length  sequences  exact-match  token accuracy")
    for length, figures in result["by_length"].items():
        print(f"{length:13d}  {figures['sequences']:9d}  {figures['exact_match']:11.1%}  {figures['token_accuracy']:14.1%}")


def show_samples(samples):
    for source, predicted, right in samples:
        output = [token for token in predicted if token != EOS]
        print(f"  {describe(source)} -> {describe(output)}{'' if EOS in predicted else ' (no EOS)'}  {'✓' if right else '✗'}")


def show_evaluation(run, label):
    """`--checkpoint ... --evaluate`: held-out accuracy of a trained run, its samples and, on request, by length."""
    result = run.evaluate(run.eval_set())
    print(f"{label} (step {run.step}): held-out exact-match {result['exact_match']:.1%}, "
          f"token accuracy {result['token_accuracy']:.1%} on {result['sequences']} sequences")
    show_samples(result["samples"])
    if run.config.by_length:
        show_by_length(result)


def attention_of(run, source):
    """Greedy-decode one source (token ids) in eval mode: the ids it produces, and its
    attention on the source as a host array (layers, heads, outputs, inputs), or None for
    a model without attention."""
    batch = run.task.make_batch([source], device=run.config.device)
    training = run.model.training
    run.model.eval()
    try:
        (predicted,), all_maps = run.greedy_decode(batch.source, run.config.max_len + 1, need_weights=True)
    finally:
        run.model.train(training)
    return predicted, None if all_maps is None else backend.to_host(all_maps[0])


def show_decode(run, source, svg_path):
    """Decode one source (token ids), print it against the task's answer, and draw its attention maps."""
    predicted, maps = attention_of(run, source)
    expected = run.task.target_for(source) + [EOS]
    print(f"{describe(source)} -> {describe([t for t in predicted if t != EOS])}  "
          f"{'✓' if predicted == expected else '✗ expected ' + describe(expected[:-1])} ({run.config.task})")
    if maps is None:
        print("(this model has no attention to draw: its decoder sees only the encoder's last state)")
        return
    rows, columns = [describe([t]) for t in predicted], [describe([t]) for t in source]
    kind = ATTENTION_KINDS[run.config.model]
    for layer, heads in enumerate(maps):
        for head, weights in enumerate(heads):
            print(f"\n{kind}, layer {layer + 1}, head {head + 1} (rows: outputs, columns: inputs)")
            print(heatmap_text(weights, rows, columns))
    with open(svg_path, "w") as file:
        file.write(attention_svg(maps, rows, columns, title=kind))
    print(f"\nwrote {svg_path}")
