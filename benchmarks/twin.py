"""PyTorch twins of models/transformer.py's Seq2SeqTransformer and models/gpt.py's
DecoderOnlyTransformer, for fair speed comparisons.

    python benchmarks/twin.py          check the twins against tinyattn: logits, loss, gradients, decoding

Same architecture, layer by layer, and the same parameter names, so a tinyattn
state_dict loads into either (`twin_of(model)`) and both sides can start from identical
weights. Only imported where torch is installed; the benchmarks check
first and skip the PyTorch side otherwise.
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import common  # noqa: F401  (first: it puts the checkout on sys.path when this runs as a script)
from tinyattn.tasks import BOS, EOS, PAD


class MultiHeadAttention(nn.Module):
    """Separate q/k/v/out projections around F.scaled_dot_product_attention, as tinyattn's."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj, self.k_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.v_proj, self.out_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)

    def _split_heads(self, x):
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, context=None, mask=None, causal=False):
        """mask: boolean, True where a query may attend (broadcast to (B, h, T, S))."""
        context = x if context is None else context
        q, k, v = self._split_heads(self.q_proj(x)), self._split_heads(self.k_proj(context)), self._split_heads(self.v_proj(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        batch, length, d_model = x.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, d_model))


class FeedForward(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.linear2(F.relu(self.linear1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, d_model, n_heads, d_ff):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.feed_forward = FeedForward(d_model, d_ff)

    def forward(self, x, mask=None, causal=False):
        x = x + self.self_attn(self.norm1(x), mask=mask, causal=causal)
        return x + self.feed_forward(self.norm2(x))


class DecoderLayer(EncoderLayer):
    def __init__(self, d_model, n_heads, d_ff):
        super().__init__(d_model, n_heads, d_ff)
        self.cross_norm = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, n_heads)

    def forward(self, x, memory, memory_mask):
        x = x + self.self_attn(self.norm1(x), causal=True)
        x = x + self.cross_attn(self.cross_norm(x), context=memory, mask=memory_mask)
        return x + self.feed_forward(self.norm2(x))


class Stack(nn.Module):
    def __init__(self, layer_class, num_layers, d_model, n_heads, d_ff):
        super().__init__()
        self.layers = nn.ModuleList(layer_class(d_model, n_heads, d_ff) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x, *args, **kwargs):
        for layer in self.layers:
            x = layer(x, *args, **kwargs)
        return self.norm(x)


class LearnedPositions(nn.Module):
    def __init__(self, max_len, d_model):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_len, d_model).normal_(0.0, 0.02))

    def forward(self, x, offset=0):
        return x + self.weight[offset:offset + x.shape[1]]


class Seq2SeqTwin(nn.Module):
    """Shared token embedding + learned positions, pre-LN encoder and decoder with final norms, head."""

    def __init__(self, vocab_size, d_model=64, n_heads=4, encoder_layers=2, decoder_layers=2, d_ff=256, max_len=64):
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = nn.Embedding(vocab_size, d_model)  # N(0, 1), as tinyattn's
        self.position = LearnedPositions(max_len, d_model)
        self.encoder = Stack(EncoderLayer, encoder_layers, d_model, n_heads, d_ff)
        self.decoder = Stack(DecoderLayer, decoder_layers, d_model, n_heads, d_ff)
        self.head = nn.Linear(d_model, vocab_size)

    @classmethod
    def from_config(cls, config, vocab_size):
        """The twin of models.build_model(config, vocab_size) for model 'transformer'."""
        if config.model != "transformer" or config.dropout:
            raise ValueError("the twin covers the encoder-decoder with learned positions, ReLU and no dropout")
        return cls(vocab_size, config.d_model, config.heads, config.layers, config.layers, config.d_ff,
                   max_len=config.max_len + 1)

    @classmethod
    def from_tinyattn(cls, model):
        """A twin holding a copy of a tinyattn Seq2SeqTransformer's weights."""
        layer = model.encoder.layers[0]
        twin = cls(model.vocab_size, model.d_model, layer.self_attn.n_heads, len(model.encoder.layers),
                   len(model.decoder.layers), layer.feed_forward.linear1.out_features, model.max_len)
        return _load_weights(twin, model)

    def encode(self, source):
        mask = (source != PAD)[:, None, None, :]
        return self.encoder(self.position(self.embed(source)), mask), mask

    def decode(self, decoder_input, memory, memory_mask):
        return self.head(self.decoder(self.position(self.embed(decoder_input)), memory, memory_mask))

    def forward(self, source, decoder_input):
        memory, mask = self.encode(source)
        return self.decode(decoder_input, memory, mask)

    def loss(self, source, decoder_input, labels):
        logits = self(source, decoder_input)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=PAD)

    @torch.inference_mode()
    def greedy_decode(self, source, max_new_tokens):
        """Batched greedy decoding without a cache (the decoder re-reads the prefix each step);
        rows as lists of ids up to and including EOS, like tinyattn's greedy_decode."""
        if max_new_tokens > self.max_len:
            raise ValueError(f"cannot decode {max_new_tokens} tokens: positions stop at max_len {self.max_len}")
        memory, mask = self.encode(source)
        prefix = torch.full((source.shape[0], 1), BOS, dtype=torch.long)
        finished = torch.zeros(source.shape[0], dtype=torch.bool)
        generated = []
        for _ in range(max_new_tokens):
            tokens = self.decode(prefix, memory, mask)[:, -1].argmax(dim=-1)
            tokens = tokens.masked_fill(finished, PAD)
            generated.append(tokens)
            finished |= tokens == EOS
            if bool(finished.all()):
                break
            prefix = torch.cat([prefix, tokens[:, None]], dim=1)
        rows = torch.stack(generated, dim=1).tolist()
        return [row[:row.index(EOS) + 1] if EOS in row else row for row in rows]


class GPTTwin(nn.Module):
    """Token embedding + learned positions, a causal pre-LN stack with a final norm, head:
    models/gpt.py's DecoderOnlyTransformer with learned positions."""

    def __init__(self, vocab_size, d_model=64, n_heads=4, num_layers=2, d_ff=256, max_len=64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = LearnedPositions(max_len, d_model)
        self.blocks = Stack(EncoderLayer, num_layers, d_model, n_heads, d_ff)
        self.head = nn.Linear(d_model, vocab_size)

    @classmethod
    def from_tinyattn(cls, model):
        """A twin holding a copy of a tinyattn DecoderOnlyTransformer's weights."""
        layer = model.blocks.layers[0]
        twin = cls(model.vocab_size, model.d_model, layer.self_attn.n_heads, len(model.blocks.layers),
                   layer.feed_forward.linear1.out_features, model.max_len)
        return _load_weights(twin, model)

    def forward(self, tokens):
        # Padding sits after each row's last token, so the causal mask alone keeps real tokens from it.
        return self.head(self.blocks(self.position(self.embed(tokens)), causal=True))

    def loss(self, tokens, labels):
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=PAD)


def _load_weights(twin, model):
    """The twin with a copy of the tinyattn model's parameters (the names match one for one)."""
    twin.load_state_dict({name: torch.from_numpy(tensor.numpy().copy()) for name, tensor in model.named_parameters()},
                         strict=True)
    return twin


def twin_of(model):
    """The PyTorch twin of a tinyattn Seq2SeqTransformer or DecoderOnlyTransformer, with its weights."""
    from models import DecoderOnlyTransformer
    return (GPTTwin if isinstance(model, DecoderOnlyTransformer) else Seq2SeqTwin).from_tinyattn(model)


def _long(tensor):
    return torch.from_numpy(tensor.numpy().astype("int64", copy=True))


def batch_tensors(batch):
    """(source, decoder_input, labels) of a tinyattn.tasks.Batch as int64 torch tensors."""
    return tuple(_long(tensor) for tensor in (batch.source, batch.decoder_input, batch.labels))


def loss_inputs(twin, batch):
    """What twin.loss takes for a tinyattn.tasks.Batch: the encoder-decoder's (source, decoder
    input, labels), or the decoder-only model's (tokens, labels) as models.gpt lays them out."""
    if isinstance(twin, GPTTwin):
        from models.gpt import language_model_batch
        return tuple(_long(tensor) for tensor in language_model_batch(batch))
    return batch_tensors(batch)


def warmup_cosine_factor(warmup_steps, total_steps):
    """LambdaLR factor for tinyattn.optim.WarmupCosine (min_lr 0): LambdaLR counts from 0 at
    construction, which is tinyattn's optimizer step 1."""
    def factor(index):
        step = index + 1
        if step <= warmup_steps:
            return step / warmup_steps
        if step >= total_steps:
            return 0.0
        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def first_step_differences(model, twin, batch):
    """One forward and backward of the same batch on both: (max |logit difference|, max relative
    gradient difference, tinyattn's loss, the twin's loss)."""
    from tinyattn.functional import cross_entropy
    logits, labels = model.forward_batch(batch)
    loss = cross_entropy(logits, labels, ignore_index=PAD)
    loss.backward()
    inputs = loss_inputs(twin, batch)
    twin_logits = twin(*inputs[:-1])
    twin_loss = F.cross_entropy(twin_logits.reshape(-1, twin_logits.shape[-1]), inputs[-1].reshape(-1), ignore_index=PAD)
    twin_loss.backward()
    twin_params = dict(twin.named_parameters())
    # relative to each gradient's size; the floor keeps the k-projection biases' gradients, zero
    # in exact arithmetic (softmax ignores a shift shared by a row's scores), from dividing noise by noise
    grad_error = max(float((twin_params[name].grad - torch.from_numpy(p.grad.numpy())).abs().max()
                           / max(float(twin_params[name].grad.abs().max()), 1e-4)) for name, p in model.named_parameters())
    # tinyattn's logits are packed to the token rows (tinyattn.packing): compare where the labels are real
    tokens, twin_tokens = labels.numpy() != PAD, (inputs[-1] != PAD).numpy()
    logit_error = float(abs(twin_logits.detach().numpy()[twin_tokens] - logits.numpy()[tokens]).max())
    return logit_error, grad_error, loss.item(), twin_loss.item()


def main():
    """Load tinyattn's initial weights into the twins and compare forward, loss, gradients and decoding."""
    from models import build_model
    from tinyattn import optim
    from tinyattn.functional import cross_entropy

    parser = argparse.ArgumentParser(description=main.__doc__)
    common.add_out_argument(parser, "twin")
    args = parser.parse_args()
    machine = common.start()
    config = common.REFERENCE
    task = common.task_for(config)
    model = build_model(config, task.vocab_size)
    twin = Seq2SeqTwin.from_tinyattn(model)
    batch = next(task.batches(config.batch_size, config.seed))
    logit_error, grad_error, loss, twin_loss = first_step_differences(model, twin, batch)
    gpt_model = build_model(config.replace(model="gpt"), task.vocab_size)
    gpt_logit_error, gpt_grad_error, _, _ = first_step_differences(gpt_model, twin_of(gpt_model), batch)
    twin_params = dict(twin.named_parameters())

    # a few identical Adam steps with the same schedule keep both in step
    tiny_opt = optim.Adam(model.parameters(), lr=config.lr)
    tiny_schedule = optim.WarmupCosine(tiny_opt, config.warmup, config.steps)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=config.lr)
    twin_schedule = torch.optim.lr_scheduler.LambdaLR(twin_opt, warmup_cosine_factor(config.warmup, config.steps))
    stream = task.batches(config.batch_size, config.seed)
    for _ in range(20):
        b = next(stream)
        tiny_opt.zero_grad()
        out, lab = model.forward_batch(b)
        cross_entropy(out, lab, ignore_index=PAD).backward()
        tiny_opt.step()
        tiny_schedule.step()
        twin_opt.zero_grad()
        twin.loss(*batch_tensors(b)).backward()
        twin_opt.step()
        twin_schedule.step()
    lr_match = abs(tiny_opt.lr - twin_opt.param_groups[0]["lr"]) < 1e-12
    weight_error = max(float((twin_params[name].detach() - torch.from_numpy(p.numpy())).abs().max())
                       for name, p in model.named_parameters())
    model.eval()
    eval_batch = task.eval_set(64, config.seed, batch_size=64)[0]
    tiny_rows, _ = model.greedy_decode(eval_batch.source, task.max_len + 1)
    twin_rows = twin.greedy_decode(batch_tensors(eval_batch)[0], task.max_len + 1)
    same_rows = sum(a == b for a, b in zip(tiny_rows, twin_rows))

    figures = {"max_abs_logit_difference": logit_error, "loss_tinyattn": loss, "loss_torch": twin_loss,
               "max_relative_gradient_difference": grad_error, "gpt_max_abs_logit_difference": gpt_logit_error,
               "gpt_max_relative_gradient_difference": gpt_grad_error, "lr_after_20_steps_equal": lr_match,
               "max_abs_weight_difference_after_20_adam_steps": weight_error,
               "identical_greedy_rows_after_20_steps": f"{same_rows}/{len(tiny_rows)}"}
    common.write_results("twin", machine, {"config": config.to_dict(), "batch_shape": list(batch.source.shape)}, figures,
                         args.out)
    print("\nPyTorch twins vs tinyattn, same initial weights and batches (reference config; gpt: --model gpt)")
    common.table(["check", "value"], [
        ["max |logits difference|", f"{logit_error:.2e}"],
        ["loss tinyattn / torch", f"{loss:.6f} / {twin_loss:.6f}"],
        ["max relative gradient difference", f"{grad_error:.2e}"],
        ["gpt: max |logits difference|", f"{gpt_logit_error:.2e}"],
        ["gpt: max relative gradient difference", f"{gpt_grad_error:.2e}"],
        ["lr equal after 20 scheduled steps", str(lr_match)],
        ["max |weight difference| after 20 Adam steps", f"{weight_error:.2e}"],
        ["identical greedy rows", figures["identical_greedy_rows_after_20_steps"]]])
    return 0 if max(logit_error, gpt_logit_error) < 1e-3 and max(grad_error, gpt_grad_error) < 1e-2 and lr_match else 1


if __name__ == "__main__":
    raise SystemExit(main())
