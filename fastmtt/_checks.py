"""Argument validation shared by the public functions: clear errors that name the argument."""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch


def check_bool(name, value):
    """A bool (not a truthy stand-in such as "y" or 1)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_number(name, value, *, least=None, above=None, optional=False):
    """A real number (not a bool or a string), finite, >= least or > above where given; None too when optional."""
    if value is None and optional:
        return
    kind = "None or a finite real number" if optional else "a finite real number"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if least is not None and not value >= least:
        raise ValueError(f"{name} must be >= {least}, got {value!r}")
    if above is not None and not value > above:
        raise ValueError(f"{name} must be > {above}, got {value!r}")


def check_float_tensor(name, tensor, *, shape=None, min_dim=1):
    """A floating tensor with at least `min_dim` dims, of exactly `shape` when given."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if tensor.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(tensor.shape)}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_labels(labels, shape):
    """labels: an integer tensor of `shape` (its values are read by `check_values`)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels must have shape {tuple(shape)} to match the rows, got {tuple(labels.shape)}")


def check_ce_rows(ce_rows, labels):
    """ce_rows: None or a bool tensor of labels' shape and device (the rows whose CE counts)."""
    if ce_rows is None:
        return
    if not isinstance(ce_rows, torch.Tensor) or ce_rows.dtype != torch.bool:
        raise TypeError(f"ce_rows must be None or a bool tensor, got {getattr(ce_rows, 'dtype', type(ce_rows))}")
    if tuple(ce_rows.shape) != tuple(labels.shape) or ce_rows.device != labels.device:
        raise ValueError(f"ce_rows must have labels' shape {tuple(labels.shape)} on {labels.device}, got "
                         f"{tuple(ce_rows.shape)} on {ce_rows.device}")


def check_values(labels, n_cols, ignore_index, num_items_in_batch=None, *, count_predicted=False):
    """The one host read of an op's call (a device sync on CUDA; nothing is read under torch.compile, where
    the kernels' NaN poisoning of a bad label's row remains): labels must lie in [0, n_cols) or equal
    ignore_index (n_cols None: a vocabulary split across ranks, only >= 0 is checked; a label no rank
    holds makes its row NaN), and a num_items_in_batch tensor must be >= 0.

    Returns:
        The number of labels other than ignore_index when count_predicted (None under torch.compile), else None.
    """
    if torch.compiler.is_compiling():
        return None
    reads = {}  # name -> 0-d device tensor, read in one transfer
    if labels.numel():
        out_of_range = (labels < 0) if n_cols is None else (labels < 0) | (labels >= n_cols)
        bad = ((labels != ignore_index) & out_of_range).reshape(-1)
        reads.update(any_bad=bad.any(), first_bad=labels.reshape(-1)[bad.to(torch.int8).argmax()])
    if isinstance(num_items_in_batch, torch.Tensor):
        reads["negative_items"] = num_items_in_batch.reshape(()) < 0
    if count_predicted:
        reads["predicted"] = (labels != ignore_index).sum()
    if not reads:
        return None
    values = dict(zip(reads, torch.stack([v.to(device=labels.device, dtype=torch.int64)
                                          for v in reads.values()]).tolist()))
    if values.get("any_bad"):
        valid = f"[0, {n_cols})" if n_cols is not None else ">= 0"
        raise ValueError(f"labels must lie in {valid} or equal ignore_index={ignore_index}, "
                         f"found {values['first_bad']}")
    if values.get("negative_items"):
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch!r}")
    return values.get("predicted")


def check_num_items(num_items_in_batch, reduction):
    """num_items_in_batch: None, or (with reduction 'mean') a non-negative integer: an int, a numpy integer or
    a one-element integer tensor (whose sign `check_values` reads). Floats (3.0 too) and bools are refused."""
    if num_items_in_batch is None:
        return
    if reduction != "mean":
        raise ValueError("num_items_in_batch applies to reduction='mean' only")
    count = num_items_in_batch
    if isinstance(count, torch.Tensor):
        if count.numel() != 1 or count.is_floating_point() or count.is_complex() or count.dtype == torch.bool:
            raise ValueError(f"num_items_in_batch must be one integer, got {count!r}")
        return
    if isinstance(count, bool) or not isinstance(count, Integral):
        raise ValueError(f"num_items_in_batch must be a non-negative integer, got {count!r}")
    if count < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {count!r}")


def check_vocab_parallel(vocab_parallel, name, n_cols):
    """vocab_parallel: None or a fastmtt.VocabParallel covering the n_cols columns of `name`."""
    if vocab_parallel is None:
        return
    from fastmtt.parallel import VocabParallel

    if not isinstance(vocab_parallel, VocabParallel):
        raise TypeError(f"vocab_parallel must be a fastmtt.VocabParallel, got {type(vocab_parallel).__name__}")
    vocab_parallel.check_columns(name, n_cols)
