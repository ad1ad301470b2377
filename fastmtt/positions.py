"""Which positions of a causal-LM batch predict a token: padding (either side) and sequence boundaries of
packed batches (position_ids restarting, seq_idx, cu_seq_lens) take no part, so no row crosses a sequence."""
import torch


def predicted_positions(labels, attention_mask, ignore_index):
    """(labelled, attended): [B, L - 1] masks over the positions t, each predicting token t + 1: attended
    where attention_mask [B, L] keeps both t and t + 1 in one sequence (both nonzero and equal; everywhere
    when it is None), labelled where moreover labels[:, t + 1] is not ignore_index. So padding, left or
    right, takes no part, and a mask of sequence ids (`sequence_ids`: 1, 1, 2, 2, 2, 0 for two packed
    sequences and a pad) ends every row set at a sequence boundary."""
    if attention_mask is None:
        attended = torch.ones_like(labels[:, 1:], dtype=torch.bool)
    elif tuple(attention_mask.shape) != tuple(labels.shape):
        raise ValueError(f"attention_mask must have the shape of labels {tuple(labels.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    else:
        attended = (attention_mask[:, :-1] != 0) & (attention_mask[:, :-1] == attention_mask[:, 1:])
    return attended & (labels[:, 1:] != ignore_index), attended


# Keywords of packed (padding-free) batches that mark where sequences start, besides position_ids.
_CU_SEQ_LENS = ("cu_seq_lens_q", "cu_seq_lens_k")


def sequence_ids(labels, attention_mask=None, position_ids=None, seq_idx=None, cu_seq_lens=()):
    """The attention mask `predicted_positions` reads for a packed batch: [B, L] int64, 0 where attention_mask
    [B, L] is 0, elsewhere one id per sequence. A sequence starts at each row's first position and where
    position_ids [B, L] or [1, L] do not step by one (as transformers' `find_packed_sequence_indices` reads
    them: DataCollatorWithFlattening restarts them), seq_idx [B, L] changes, attention_mask changes value,
    or at an offset of cu_seq_lens (FlashAttention's cu_seq_lens_q / _k, 1-D, from 0 to B * L over the
    flattened batch). Returns attention_mask itself where none of position_ids, seq_idx, cu_seq_lens is given;
    position_ids of another rank (multimodal rotary positions) are not read."""
    cu_seq_lens = [(name, value) for name, value in cu_seq_lens if value is not None]
    if position_ids is not None and position_ids.dim() != 2:
        position_ids = None
    if position_ids is None and seq_idx is None and not cu_seq_lens:
        return attention_mask
    shape = tuple(labels.shape)
    starts = torch.zeros(shape, dtype=torch.bool, device=labels.device)
    starts[:, 0] = True
    for name, ids in (("position_ids", position_ids), ("seq_idx", seq_idx), ("attention_mask", attention_mask)):
        if ids is None:
            continue
        if ids.dim() != 2 or ids.shape[1] != shape[1] or ids.shape[0] not in (1, shape[0]):
            raise ValueError(f"{name} must have the shape of labels {shape} (or [1, {shape[1]}]), "
                             f"got {tuple(ids.shape)}")
        ids = ids.to(labels.device).expand(shape)
        steps = ids[:, 1:] - ids[:, :-1]
        starts[:, 1:] |= steps != 1 if name == "position_ids" else steps != 0
    flat = starts.view(-1)
    for name, offsets in cu_seq_lens:
        if (offsets.dim() != 1 or offsets.is_floating_point() or offsets.numel() < 2
                or int(offsets[0]) != 0 or int(offsets[-1]) != flat.numel() or bool((offsets.diff() < 0).any())):
            raise ValueError(f"{name} must be the 1-D cumulative sequence lengths of the flattened batch, from 0 to "
                             f"{flat.numel()} (B * L), got {offsets.tolist()}")
        flat[offsets[:-1].to(device=flat.device, dtype=torch.int64)] = True
    ids = flat.cumsum(0).view(shape)
    return ids if attention_mask is None else ids * (attention_mask.to(ids.device) != 0)


def batch_sequence_ids(labels, inputs):
    """`sequence_ids` of a batch's model inputs (attention_mask, position_ids, seq_idx, cu_seq_lens_q / _k)."""
    return sequence_ids(labels, inputs.get("attention_mask"), inputs.get("position_ids"), inputs.get("seq_idx"),
                        [(name, inputs.get(name)) for name in _CU_SEQ_LENS])
