"""BaseCache: the frozen base model's final hidden states, computed once and read back for every step.

MTT's base shares the output head with the adapted model, so the base's final hidden states (the head's
input) determine its next-token distributions exactly: caching them [L, H] per example replaces the base
pass of every later step, epoch and run on the same data, at H x (bytes of the dtype) per token.

Layout of a cache directory (readable without fastmtt: safetensors and JSON):
    fingerprint.json                   the base model's fingerprint (config, dtype, sampled weight hashes)
    shard-r<rank>-<n>.safetensors      one [L, H] tensor per example, named by the example's key
    index.json                         key -> (shard, length); written last: a cache without it is unfinished
An example's key is a hash of its attended tokens, so a batch row is found whatever the order, the batch
it comes in, the padding side or the packing. Each shard is written to a temporary file and renamed into
place: a killed build leaves whole shards only, and the next build skips the examples they hold.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

FORMAT = "fastmtt-base-cache/1"
FINGERPRINT_FILE, INDEX_FILE = "fingerprint.json", "index.json"
SAMPLES_PER_TENSOR = 1024  # evenly spaced entries of every frozen tensor hashed into the fingerprint
# Config entries that do not change the function the base computes (names, versions, output switches).
_CONFIG_NOISE = {"transformers_version", "torch_dtype", "dtype", "name_or_path", "architectures", "use_cache",
                 "output_attentions", "output_hidden_states", "return_dict"}
_SHARD = re.compile(r"shard-r(\d+)-(\d+)\.safetensors$")


def example_key(tokens) -> str:
    """The cache key of one example: a hash of its token ids (a list or a 1-D tensor) in order."""
    ids = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1).cpu()
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:32]


def row_segments(input_ids, attention_mask=None, position_ids=None) -> List[List[torch.Tensor]]:
    """The examples in each row of a [B, L] batch, as index tensors of their positions: the attended
    positions (attention_mask 1; all without a mask), split where position_ids do not count up by one
    (packed rows: every example restarts its positions)."""
    rows = []
    for b in range(input_ids.shape[0]):
        kept = (torch.arange(input_ids.shape[1]) if attention_mask is None
                else attention_mask[b].cpu().bool().nonzero().reshape(-1))
        if position_ids is None or kept.numel() < 2:
            rows.append([kept] if kept.numel() else [])
            continue
        positions = position_ids[b if position_ids.shape[0] > 1 else 0].cpu()[kept]
        starts = ((positions[1:] != positions[:-1] + 1).nonzero().reshape(-1) + 1).tolist()
        rows.append(list(torch.tensor_split(kept, starts)))
    return rows


def _describe(tokens: torch.Tensor) -> str:
    shown = tokens[:8].tolist()
    return f"{tokens.numel()} tokens, starting {shown}" + (" ..." if tokens.numel() > 8 else "")


# --- the base model: its decoder with the adapters off, and its fingerprint ------------------------------

def _base_of(model):
    """(causal LM, adapters_off): adapters_off() is a context manager turning the adapters off, for a PEFT
    model (or a DDP/FSDP wrapper of one); a plain causal LM is its own base (a context doing nothing)."""
    from peft import PeftModel

    while not isinstance(model, PeftModel) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    if isinstance(model, PeftModel):
        return model.get_base_model(), model.disable_adapter
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a peft.PeftModel or a causal LM (torch.nn.Module), got {type(model).__name__}")
    return model, contextlib.nullcontext


def _frozen_tensors(causal_lm) -> Dict[str, torch.Tensor]:
    """The base model's own parameters by their plain-model names: adapter tensors (LoRA's A and B, ...)
    left out, PEFT's `.base_layer` / `.original_module` dropped from the names."""
    from fastmtt.models import adapter_modules

    adapter = {id(p) for module in adapter_modules(causal_lm) for p in module.parameters(recurse=False)}
    tensors = {}
    for name, param in causal_lm.named_parameters():
        if id(param) in adapter or ".modules_to_save." in name:
            continue
        tensors[name.replace(".base_layer", "").replace(".original_module", "")] = param
    return tensors


def _tensor_hash(tensor: torch.Tensor) -> str:
    """Hash of a tensor's shape, dtype and SAMPLES_PER_TENSOR evenly spaced entries (exact bytes)."""
    if hasattr(tensor, "full_tensor"):  # a DTensor (FSDP2): its global values
        tensor = tensor.full_tensor()
    flat = tensor.detach().reshape(-1)
    picks = torch.linspace(0, max(flat.numel() - 1, 0), min(flat.numel(), SAMPLES_PER_TENSOR),
                           dtype=torch.float64).round().long()  # fp32 rounds indices past 2**24 beyond the end
    sample = flat[picks.to(flat.device)].cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
    digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(model) -> dict:
    """The base model's fingerprint: its config (without names and switches), the dtype of its input
    embedding and a hash of sampled entries of every frozen tensor; `digest` sums them up."""
    causal_lm, _ = _base_of(model)
    config = getattr(causal_lm, "config", None)
    settings = config.to_dict() if hasattr(config, "to_dict") else {}
    settings = {k: v for k, v in settings.items() if not k.startswith("_") and k not in _CONFIG_NOISE}
    settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
    embedding = causal_lm.get_input_embeddings() if hasattr(causal_lm, "get_input_embeddings") else None
    dtype = str(next(causal_lm.parameters()).dtype if embedding is None else embedding.weight.dtype)
    tensors = {name: _tensor_hash(t) for name, t in sorted(_frozen_tensors(causal_lm).items())}
    summary = json.dumps(dict(config=settings, dtype=dtype, tensors=tensors), sort_keys=True)
    return dict(digest=hashlib.sha256(summary.encode()).hexdigest()[:32], dtype=dtype, config=settings,
                tensors=tensors)


def fingerprint_difference(built: dict, other: dict) -> Optional[str]:
    """What differs between two fingerprints, in words; None when they agree."""
    if built["digest"] == other["digest"]:
        return None
    if built["dtype"] != other["dtype"]:
        return f"dtype {other['dtype']}, the cache's base {built['dtype']}"
    keys = sorted(k for k in built["config"].keys() | other["config"].keys()
                  if built["config"].get(k) != other["config"].get(k))
    if keys:
        return "config " + ", ".join(f"{k}={other['config'].get(k)!r} (cache: {built['config'].get(k)!r})"
                                     for k in keys[:3])
    missing = sorted(built["tensors"].keys() ^ other["tensors"].keys())
    if missing:
        return f"tensor {missing[0]} is in only one of them"
    changed = [name for name in built["tensors"] if built["tensors"][name] != other["tensors"][name]]
    return f"{len(changed)} weight tensor(s) differ, first {changed[0]}"


# --- writing ---------------------------------------------------------------------------------------------

def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    write(temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _write_json(path: str, value) -> None:
    def write(temporary):
        with open(temporary, "w") as handle:
            json.dump(value, handle)
    _atomic_write(path, write)


def _shard_names(path: str) -> List[str]:
    return sorted(name for name in os.listdir(path) if _SHARD.fullmatch(name))


def _shard_entries(path: str, name: str, digest: str) -> Dict[str, Tuple[str, int]]:
    """key -> (shard, length) for every example in one shard; a shard of another base is an error."""
    from safetensors import safe_open

    with safe_open(os.path.join(path, name), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("fingerprint") != digest:
            raise ValueError(f"{os.path.join(path, name)} was written for another base model (fingerprint "
                             f"{metadata.get('fingerprint')}, the cache's {digest}): remove it or use another path")
        return {key: (name, handle.get_slice(key).get_shape()[0]) for key in handle.keys()}


def _examples_of(item) -> List[torch.Tensor]:
    """The examples (1-D token tensors) of one item: a dict with input_ids [L] or [B, L] (and optional
    attention_mask, position_ids of that shape), or a token list / tensor."""
    if not isinstance(item, dict):
        item = dict(input_ids=item)
    if "input_ids" not in item:
        raise ValueError(f"examples: each example needs input_ids, got keys {sorted(item)}")
    input_ids = torch.as_tensor(item["input_ids"])
    if input_ids.dtype.is_floating_point or input_ids.dim() not in (1, 2):
        raise ValueError(f"examples: input_ids must be integer token ids [L] or [B, L], got {input_ids.dtype} "
                         f"of shape {tuple(input_ids.shape)}")
    extra = {name: None if item.get(name) is None else torch.as_tensor(item[name]).reshape(-1, input_ids.shape[-1])
             for name in ("attention_mask", "position_ids")}
    input_ids = input_ids.reshape(-1, input_ids.shape[-1])
    return [input_ids[b, index].cpu() for b, segments in enumerate(row_segments(input_ids, **extra))
            for index in segments]


def _progress(total: Optional[int], show: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="base cache", unit="ex", disable=not show or not sys.stderr.isatty())


class BaseCache:
    """The final hidden states of a frozen base model on a set of examples, memory-mapped from disk.

    Build once with `BaseCache.build(model, examples, path)`, open with `BaseCache.open(path)`, and hand it
    to `MTTObjective(base_cache=...)` (Trainer: `mtt_base_cache=`), which then skips the base pass.

    Reading: `tokens in cache`, `cache[tokens]` ([n, H], the example's states; KeyError when absent),
    `cache.base_hidden(input_ids, attention_mask, position_ids)` ([B, L, H] aligned with a batch, zeros where
    nothing is attended). on_miss="raise" (default): a batch example not in the cache is an error naming it;
    "compute": its states come from a live base pass (`compute=`), counted in `cache.misses`.

    Args:
        path: the cache directory (of `open`; `build` documents its own arguments).
        on_miss: "raise" (default) or "compute".

    Example:
        >>> import tempfile, fastmtt, peft, transformers
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        >>> model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
        ...                             peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        >>> examples = [dict(input_ids=torch.randint(0, 64, (n,))) for n in (5, 8, 6)]
        >>> cache = fastmtt.BaseCache.build(model, examples, tempfile.mkdtemp(), progress=False)
        >>> len(cache), tuple(cache[examples[1]["input_ids"]].shape)  # [n, H] per example
        (3, (8, 16))
        >>> objective = fastmtt.MTTObjective(base_cache=cache)  # the base pass is read, not run
        >>> ids = examples[1]["input_ids"][None]
        >>> objective(model, input_ids=ids, labels=ids).loss.backward()
    """

    def __init__(self, path: str, index: dict, fingerprint: dict, on_miss: str = "raise"):
        self.path, self.fingerprint, self.on_miss = str(path), fingerprint, on_miss
        self.entries: Dict[str, Tuple[str, int]] = {key: tuple(v) for key, v in index["examples"].items()}
        self.hidden_size, self.dtype = int(index["hidden_size"]), getattr(torch, index["dtype"])
        self.misses = 0
        self._handles: Dict[str, object] = {}
        self._checked = weakref.WeakSet()

    def __repr__(self):
        return (f"BaseCache({self.path!r}, {len(self)} examples, hidden_size={self.hidden_size}, "
                f"dtype={self.dtype}, on_miss={self.on_miss!r})")

    def __len__(self):
        return len(self.entries)

    def __contains__(self, tokens):
        return example_key(tokens) in self.entries

    def __getitem__(self, tokens) -> torch.Tensor:
        key = example_key(tokens)
        if key not in self.entries:
            raise KeyError(f"example ({_describe(torch.as_tensor(tokens).reshape(-1))}) is not in the base cache "
                           f"at {self.path}")
        return self._read(key)

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        shard = self.entries[key][0]
        if shard not in self._handles:  # memory-mapped; a read copies out one example
            self._handles[shard] = safe_open(os.path.join(self.path, shard), framework="pt")
        return self._handles[shard].get_tensor(key)

    # --- opening and building ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path, *, on_miss: str = "raise") -> BaseCache:
        """Open a built cache (nothing is loaded but its index). Args: path: the cache directory;
        on_miss: "raise" (default) or "compute" (see the class docstring)."""
        if on_miss not in ("raise", "compute"):
            raise ValueError(f"on_miss must be 'raise' or 'compute', got {on_miss!r}")
        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, FINGERPRINT_FILE)):
            raise FileNotFoundError(f"no base cache at {path} (no {FINGERPRINT_FILE}): build one with "
                                    "BaseCache.build(model, examples, path) or `fastmtt cache-base`")
        if not os.path.isfile(os.path.join(path, INDEX_FILE)):
            raise ValueError(f"the base cache at {path} is unfinished (a build was interrupted): run "
                             "BaseCache.build again with the same arguments to resume it")
        with open(os.path.join(path, FINGERPRINT_FILE)) as handle:
            built = json.load(handle)
        with open(os.path.join(path, INDEX_FILE)) as handle:
            index = json.load(handle)
        if index.get("format") != FORMAT or index.get("fingerprint") != built["digest"]:
            raise ValueError(f"{os.path.join(path, INDEX_FILE)} is not a {FORMAT} index of this cache")
        return cls(path, index, built, on_miss)

    @classmethod
    def build(cls, model, examples: Iterable, path, *, batch_size: int = 8, dtype: Optional[torch.dtype] = None,
              shard_bytes: int = 2**30, progress: bool = True) -> BaseCache:
        """Run the base model over `examples` and write its final hidden states to `path`.

        Args:
            model: a peft.PeftModel (its adapters are disabled for the build) or the plain base causal LM.
            examples: an iterable of dicts with input_ids (a list or 1-D tensor; optionally attention_mask
                and position_ids; a packed row is split into its examples), or of DataLoader batches
                ([B, L] tensors), or of token lists. Duplicates and examples already cached are skipped.
            path: the cache directory (created; an existing cache of the same base is extended, an
                interrupted build resumed).
            batch_size: examples per base forward (default 8). dtype: of the stored states (default: the
                model's output dtype). shard_bytes: a shard is written once it holds this much (default 1 GiB).
            progress: a progress bar on a terminal (default True).
        Under torch.distributed every rank passes the same examples, computes every world_size-th new one
        and writes its own shards; rank 0 writes the index once all are done.

        Returns:
            the opened BaseCache.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        path = os.fspath(path)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
            else (0, 1)
        causal_lm, adapters_off = _base_of(model)
        from fastmtt.models import decoder_of

        decoder = decoder_of(causal_lm)
        device = next(causal_lm.parameters()).device
        built = fingerprint(model)
        os.makedirs(path, exist_ok=True)
        saved_path = os.path.join(path, FINGERPRINT_FILE)
        if os.path.isfile(saved_path):
            with open(saved_path) as handle:
                difference = fingerprint_difference(json.load(handle), built)
            if difference is not None:
                raise ValueError(f"{path} holds a base cache of another base model ({difference}): use another path")
        elif rank == 0:
            _write_json(saved_path, built)
        for name in os.listdir(path):  # temporary files of this rank's killed builds
            if re.fullmatch(rf"shard-r{rank}-\d+\.safetensors\.tmp\d+", name):
                os.remove(os.path.join(path, name))
        done = {}
        for name in _shard_names(path):
            done.update(_shard_entries(path, name, built["digest"]))
        numbers = [int(_SHARD.fullmatch(n).group(2)) for n in _shard_names(path) if _SHARD.fullmatch(n).group(1)
                   == str(rank)]
        if world > 1:  # every rank has read the same finished shards before any writes new ones
            dist.barrier()
        writer = _ShardWriter(path, rank, max(numbers, default=-1) + 1, built["digest"], shard_bytes,
                              _layout_of(path, done) if done else None)
        bar = _progress(len(examples) if hasattr(examples, "__len__") else None, progress and rank == 0)
        pending: List[Tuple[str, torch.Tensor]] = []
        seen = set(done)

        def flush():
            if pending:
                writer.add(_base_states(decoder, adapters_off, [tokens for _, tokens in pending], device, dtype),
                           [key for key, _ in pending])
                pending.clear()

        training = causal_lm.training
        causal_lm.eval()
        try:
            for item in examples:
                for tokens in _examples_of(item):
                    key = example_key(tokens)
                    if key in seen:
                        continue
                    if len(seen) % world == rank:  # the n-th new example goes to rank n mod world
                        pending.append((key, tokens))
                        if len(pending) == batch_size:
                            flush()
                    seen.add(key)
                if bar is not None:
                    bar.update(1)
            flush()
            writer.close()
        finally:
            causal_lm.train(training)
            if bar is not None:
                bar.close()
        if world > 1:
            dist.barrier()
        if rank == 0:
            index = {}
            for name in _shard_names(path):
                index.update(_shard_entries(path, name, built["digest"]))
            hidden_size, stored = writer.layout or _layout_of(path, index)
            _write_json(os.path.join(path, INDEX_FILE), dict(format=FORMAT, fingerprint=built["digest"],
                                                             hidden_size=hidden_size, dtype=stored, examples=index))
        if world > 1:
            dist.barrier()
        return cls.open(path)

    # --- reading for a batch --------------------------------------------------------------------------------

    def check_model(self, model) -> None:
        """Raise ValueError unless `model`'s base is the one the cache was built from (checked once per model)."""
        if model in self._checked:
            return
        difference = fingerprint_difference(self.fingerprint, fingerprint(model))
        if difference is not None:
            raise ValueError(f"base_cache: the cache at {self.path} was built from another base model "
                             f"({difference}); build a cache for this model")
        self._checked.add(model)

    def base_hidden(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    position_ids: Optional[torch.Tensor] = None, *,
                    compute: Optional[Callable[[List[int]], torch.Tensor]] = None) -> torch.Tensor:
        """The cached base states aligned with a batch: [B, L, H] in the cache's dtype, on input_ids' device,
        each example's states at its positions (`row_segments`), zeros elsewhere. compute(rows) -> [len(rows),
        L, H], the live base states of those batch rows, serves examples not in the cache when on_miss is
        "compute"."""
        batch, length = input_ids.shape
        out = torch.zeros(batch, length, self.hidden_size, dtype=self.dtype,
                          pin_memory=input_ids.is_cuda)
        ids = input_ids.cpu()
        missing = []
        cpu = [None if t is None else t.cpu() for t in (attention_mask, position_ids)]
        for b, segments in enumerate(row_segments(ids, *cpu)):
            for index in segments:
                tokens = ids[b, index]
                key = example_key(tokens)
                if key in self.entries:
                    out[b, index] = self._read(key)
                elif self.on_miss == "raise" or compute is None:
                    raise ValueError(
                        f"base_cache: batch row {b}, the example at positions {int(index[0])}..{int(index[-1])} "
                        f"({_describe(tokens)}), is not in the base cache at {self.path} ({len(self)} examples): "
                        "build the cache over the training data, or open it with on_miss='compute'")
                else:
                    missing.append((b, index))
        if missing:
            rows = sorted({b for b, _ in missing})
            live = compute(rows).to("cpu", self.dtype)
            for b, index in missing:
                out[b, index] = live[rows.index(b), index]
            self.misses += len(missing)
        return out.to(input_ids.device, non_blocking=True)

    def base_hidden_for(self, model, decoder, inputs: dict) -> torch.Tensor:
        """What MTTObjective's base pass returns with a cache: `base_hidden` for the batch `inputs` (the
        decoder's keyword arguments) after checking the model (fingerprint, no NEFTune noise)."""
        if inputs.get("input_ids") is None:
            raise ValueError("base_cache: the cache finds examples by their token ids: pass input_ids, not "
                             "inputs_embeds")
        self.check_model(model)
        embeddings = model.get_input_embeddings()
        if embeddings.training and getattr(embeddings, "neftune_noise_alpha", None):
            raise ValueError("base_cache: NEFTune noise (neftune_noise_alpha) changes the base pass's inputs, which "
                             "a cache of the noiseless base cannot reproduce; train without NEFTune or without "
                             "the cache")
        _, adapters_off = _base_of(model)

        def compute(rows):
            with torch.no_grad(), adapters_off():
                return decoder(**{name: value[rows] if torch.is_tensor(value) and value.dim() >= 1
                                  and value.shape[0] == inputs["input_ids"].shape[0] else value
                                  for name, value in inputs.items()}).last_hidden_state

        return self.base_hidden(inputs["input_ids"], inputs.get("attention_mask"), inputs.get("position_ids"),
                                compute=compute)


def _base_states(decoder, adapters_off, examples: List[torch.Tensor], device, dtype) -> List[torch.Tensor]:
    """The final hidden states [n, H] of each example, run together right-padded, adapters off."""
    length = max(t.numel() for t in examples)
    input_ids = torch.zeros(len(examples), length, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    for b, tokens in enumerate(examples):
        input_ids[b, :tokens.numel()], attention_mask[b, :tokens.numel()] = tokens, 1
    with torch.inference_mode(), adapters_off():
        hidden = decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                         use_cache=False).last_hidden_state
    hidden = hidden.to("cpu", dtype or hidden.dtype)
    return [hidden[b, :tokens.numel()].clone() for b, tokens in enumerate(examples)]


def _layout_of(path: str, index: dict) -> Tuple[int, str]:
    """(hidden size, dtype name) of the cache's tensors, read from one shard."""
    from safetensors import safe_open

    if not index:
        raise ValueError(f"the base cache at {path} would be empty: no examples given")
    key, (shard, _) = next(iter(index.items()))
    with safe_open(os.path.join(path, shard), framework="pt") as handle:
        tensor = handle.get_slice(key)
        return tensor.get_shape()[1], str(handle.get_tensor(key).dtype).removeprefix("torch.")


class _ShardWriter:
    """Collects examples' states and writes them as shard-r<rank>-<n>.safetensors, atomically, once
    shard_bytes are collected (and on close)."""

    def __init__(self, path: str, rank: int, number: int, digest: str, shard_bytes: int,
                 layout: Optional[Tuple[int, str]] = None):
        self.path, self.rank, self.number, self.digest, self.shard_bytes = path, rank, number, digest, shard_bytes
        self.tensors: Dict[str, torch.Tensor] = {}
        self.layout = layout  # (hidden size, dtype name) of the cache's tensors, once known

    def add(self, states: List[torch.Tensor], keys: List[str]) -> None:
        layout = (states[0].shape[1], str(states[0].dtype).removeprefix("torch."))
        if self.layout not in (None, layout):
            raise ValueError(f"the base cache at {self.path} holds {self.layout[1]} states; this build would add "
                             f"{layout[1]} ones: pass dtype=torch.{self.layout[1]}")
        self.tensors.update(zip(keys, states))
        self.layout = layout
        if sum(t.numel() * t.element_size() for t in self.tensors.values()) >= self.shard_bytes:
            self.close()

    def close(self) -> None:
        if not self.tensors:
            return
        from safetensors.torch import save_file

        name = os.path.join(self.path, f"shard-r{self.rank}-{self.number:05d}.safetensors")
        tensors = self.tensors
        _atomic_write(name, lambda temporary: save_file(tensors, temporary, metadata=dict(
            format=FORMAT, fingerprint=self.digest)))
        self.tensors, self.number = {}, self.number + 1
