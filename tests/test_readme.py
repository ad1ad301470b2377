"""The documentation cannot rot: every ```python block of README.md and docs/*.md runs as written, and the
statements the pages make about the code (which backend "auto" picks, how many kernels a call launches, which
path refuses what) are checked here against the code.

Blocks run on tiny local models (seconds, nothing downloaded): transformers' `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` return a tiny random Llama and a word-level tokenizer, whatever model name a
block gives. Each block runs in a fresh namespace (the blocks are self-contained) in a temporary working
directory. Blocks that import trl are skipped when trl is not installed (it is not a dependency). Code that
needs a GPU or several processes is shown in ```text or ```bash blocks, never as a ```python block that no test
runs.
"""
import re
import types

import pytest
import torch

from tests.utils import ROOT

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
VOCAB = 64


def python_blocks(page):
    """(first line number, source) of each ```python block of a page."""
    text = page.read_text()
    return [(text[:match.start()].count("\n") + 2, match.group(1))
            for match in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)]


BLOCKS = [(f"{page.relative_to(ROOT)}:{line}", source) for page in PAGES for line, source in python_blocks(page)]


def tiny_causal_lm(*args, **kwargs):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


def tiny_tokenizer(*args, **kwargs):
    words = "zorblat is the capital of quenthia . lies east varn".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{word: i + 3 for i, word in enumerate(words)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = tokenizers.normalizers.Lowercase()
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture
def tiny_models(monkeypatch, tmp_path):
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tiny_causal_lm)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tiny_tokenizer)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only wait for each other on a shared machine
    yield
    torch.set_num_threads(threads)


def test_the_pages_have_their_examples():
    readme = [source for name, source in BLOCKS if name.startswith("README.md:")]
    assert len(readme) >= 2
    assert "MTTObjective" in readme[0]  # the quick start comes first
    pages = {name.split(":")[0] for name, _ in BLOCKS}
    assert {"docs/training.md", "docs/api.md", "docs/kernels.md"} <= pages


def test_the_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 250


def test_no_example_imports_the_apps():
    """The apps are not a library: the examples use the public API only (docs/architecture.md)."""
    for name, source in BLOCKS:
        assert "fastmtt.apps" not in source, name


def anchors(page):
    """The anchors GitHub makes of a page's headings (lowercased; punctuation but '-' dropped; spaces to '-')."""
    text = re.sub(r"^```.*?^```$", "", page.read_text(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_links_point_at_files_and_headings():
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (page.parent / target).resolve() if target else page
            assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path), f"{page.relative_to(ROOT)} links to {target}#{anchor}: no such heading"


@pytest.mark.parametrize("name, source", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_python_block_runs(name, source, tiny_models, capsys):
    if re.search(r"^from trl |^import trl", source, flags=re.M):
        pytest.importorskip("trl")
        pytest.importorskip("datasets")
    namespace = {"__name__": "__readme__"}
    exec(compile(source, name, "exec"), namespace)
    if "for step in range(10)" in source:  # the quick start: ce falls, kl starts at 0 and grows
        steps = re.findall(r"step (\d+): ce ([\d.]+)  kl ([\d.e+-]+)", capsys.readouterr().out)
        assert len(steps) == 10
        ces, kls = [float(ce) for _, ce, _ in steps], [float(kl) for _, _, kl in steps]
        assert ces[-1] < ces[0] and kls[0] == 0 and kls[-1] > 0


# Statements of the pages about the code.

def _tensor_on(device_type, dtype=torch.float32):
    """Stands in for a tensor where only its device and dtype matter (the backend choice)."""
    return types.SimpleNamespace(is_cuda=device_type == "cuda", dtype=dtype,
                                 is_floating_point=lambda: dtype.is_floating_point)


def test_auto_backend_of_the_losses():
    """docs/api.md, docs/kernels.md: backend="auto" of mtt_loss and fused_linear_mtt_loss is Triton for CUDA
    tensors in fp32/fp16/bf16 and PyTorch otherwise (CPU tensors, float64)."""
    from fastmtt._dispatch import resolve_backend, triton_available

    assert triton_available()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert resolve_backend("auto", _tensor_on("cuda", dtype), _tensor_on("cuda", dtype)) == "triton"
        assert resolve_backend("auto", torch.zeros(1, dtype=dtype)) == "torch"
    assert resolve_backend("auto", _tensor_on("cuda", torch.float64)) == "torch"
    assert resolve_backend("torch", _tensor_on("cuda")) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", torch.zeros(1))


def test_auto_backend_of_lora_linear_is_pytorch_until_a_gpu_measurement(monkeypatch):
    """README, docs/api.md, docs/kernels.md: lora_linear(backend="auto") runs the PyTorch (cuBLAS) formulation
    on CUDA too, because no shape has been measured faster fused; backend="triton" asks for the kernel. When a
    measurement is added to FUSED_KERNEL_MEASURED_FASTER, the pages must say where auto runs the kernel."""
    from fastmtt.ops import lora_linear as op

    assert op.FUSED_KERNEL_MEASURED_FASTER == frozenset()
    seen = []
    real = op.LoRALinearFunction.apply
    monkeypatch.setattr(op.LoRALinearFunction, "apply", lambda *args: seen.append(args[-1]) or real(*args))
    x, weight, lora_a, lora_b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    op.lora_linear(x, weight, lora_a, lora_b, 2.0)  # CPU tensors
    # what CUDA tensors resolve to: "auto" runs the kernel only where the op says it serves the call
    monkeypatch.setattr(op, "resolve_backend", lambda backend, *tensors, auto_kernel: "triton"
                        if backend == "triton" or auto_kernel else "torch")
    op.lora_linear(x, weight, lora_a, lora_b, 2.0)
    op.lora_linear(x, weight, lora_a, lora_b, 2.0, backend="triton")
    assert seen == ["torch", "torch", "triton"]


@pytest.fixture
def launches():
    """The fastmtt Triton kernel launches of the test, as `registry.recording_launches` collects them."""
    from fastmtt.kernels.registry import recording_launches

    with recording_launches() as recorded:
        yield recorded


def kernel_names(launches):
    return [launch.kernel.fn.__name__ for launch in launches]


def test_launches_of_the_lora_kernel(launches):
    """docs/kernels.md: the fused LoRA linear is two launches forward (the side product, then the GEMM with it in
    its epilogue) and four backward (g = dy B, dx, dA, dB), dropout or not."""
    from fastmtt import lora_linear

    for dropout_p in (0.0, 0.25):
        x = torch.randn(6, 16, requires_grad=True)
        lora_a, lora_b = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
        y = lora_linear(x, torch.randn(8, 16), lora_a, lora_b, 2.0, dropout_p=dropout_p, backend="triton")
        assert kernel_names(launches) == ["_lora_project_kernel", "_lora_gemm_kernel"]
        launches.clear()
        y.sum().backward()
        assert kernel_names(launches) == ["_lora_project_kernel", "_lora_gemm_kernel", "_lora_weight_grad_kernel",
                            "_lora_weight_grad_kernel"]
        launches.clear()


def test_launches_of_the_loss_kernels(launches):
    """docs/kernels.md: mtt_loss is one launch of the row kernel, loss and gradient together, and backward
    launches nothing; the chunked fused-linear path launches the row kernel once per chunk (the products are
    torch matmuls); the tiled path is one launch forward and one backward."""
    import fastmtt

    torch.manual_seed(0)
    logits = torch.randn(6, 40, requires_grad=True)
    loss = fastmtt.mtt_loss(logits, torch.randn(6, 40), torch.randint(0, 40, (6,)), backend="triton")
    assert kernel_names(launches) == ["_mtt_loss_kernel"]
    loss.backward()
    assert kernel_names(launches) == ["_mtt_loss_kernel"]
    launches.clear()

    hidden = torch.randn(10, 16, requires_grad=True)
    base_hidden, weight, labels = torch.randn(10, 16), torch.randn(40, 16), torch.randint(0, 40, (10,))
    loss = fastmtt.fused_linear_mtt_loss(hidden, base_hidden, weight, labels, backend="triton", chunk_size=4)
    loss.backward()
    assert kernel_names(launches) == ["_mtt_loss_kernel"] * 3  # 10 rows in chunks of 4
    launches.clear()

    loss = fastmtt.fused_linear_mtt_loss(hidden, base_hidden, weight, labels, backend="triton", tiled=True)
    assert kernel_names(launches) == ["_linear_mtt_fwd_kernel"]
    loss.backward()
    assert kernel_names(launches) == ["_linear_mtt_fwd_kernel", "_linear_mtt_bwd_kernel"]


def test_the_tiled_path_needs_the_triton_backend():
    """docs/api.md: tiled=True on CPU tensors without backend="triton" is a ValueError."""
    import fastmtt

    hidden, weight, labels = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="tiled=True runs the Triton kernels"):
        fastmtt.fused_linear_mtt_loss(hidden, hidden, weight, labels, tiled=True)


def test_chunk_rows_on_the_cpu():
    """docs/kernels.md: on the CPU a chunk is a [rows, V] slab about the size of the hidden states [N, H], at
    least 256 rows, a multiple of 16."""
    from fastmtt.ops import chunked_linear_mtt as chunked

    cpu = torch.device("cpu")
    assert chunked.default_chunk_size(100, 64, 1000, cpu) == 256
    assert chunked.default_chunk_size(8192, 4096, 32000, cpu) == 1056  # ceil(8192 * 4096 / 32000) = 1049 -> 1056


def test_chunk_rows_on_a_gpu():
    """docs/kernels.md: on a GPU, equal chunks in multiples of 128 rows, as few as fit half the free memory
    capped at 4 GiB of slabs (10 bytes per entry: two fp32 slabs and a 16-bit gradient; 8 for fp32, 12 with
    softcap), at least 1024 rows (which overrides the cap above V of about 419k)."""
    from fastmtt.ops import chunked_linear_mtt as chunked

    cuda = torch.device("cuda")
    size = lambda n_rows, free: chunked.default_chunk_size(n_rows, 4096, 128256, cuda, free_bytes=free)  # noqa: E731
    assert size(8192, 80 << 30) == 2816  # at most 3328 rows fit 4 GiB: 3 equal chunks of 2731 -> 2816 rows
    assert size(8192, 2 << 30) == 1024  # 1 GiB fits 768 rows: the floor, 1024
    assert size(1000, 80 << 30) == 1024
    assert [chunked.slab_bytes_per_entry(dtype, softcap) for dtype, softcap in (
        (torch.bfloat16, None), (torch.float16, 30.0), (torch.float32, None), (torch.float32, 30.0))] == [10, 10, 8, 12]
    big = 500_000  # above 4 GiB / (10 bytes x 1024 rows): the 1024-row floor overrides the 4 GiB cap
    assert chunked.default_chunk_size(8192, 4096, big, cuda, free_bytes=80 << 30) == 1024


def test_vocab_parallel_exchanges_the_partials_of_each_row(monkeypatch, tmp_path):
    """docs/api.md: the ranks exchange N_PARTIALS = 11 fp32 numbers per token, one all_gather per call of
    mtt_loss and per chunk of the chunked fused-linear path."""
    import torch.distributed as dist

    import fastmtt
    from fastmtt import partials
    from fastmtt.parallel import VocabParallel

    assert partials.N_PARTIALS == 11
    gathered = []
    real = VocabParallel.all_gather
    monkeypatch.setattr(VocabParallel, "all_gather",
                        lambda self, tensor: gathered.append((tuple(tensor.shape), tensor.dtype)) or real(self, tensor))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        split = VocabParallel(0, 40)
        logits = torch.randn(6, 40, requires_grad=True)
        fastmtt.mtt_loss(logits, torch.randn(6, 40), torch.randint(0, 40, (6,)), vocab_parallel=split).backward()
        assert gathered == [((1, 11, 6), torch.float32)]
        gathered.clear()
        hidden = torch.randn(10, 16, requires_grad=True)
        fastmtt.fused_linear_mtt_loss(hidden, torch.randn(10, 16), torch.randn(40, 16), torch.randint(0, 40, (10,)),
                                      vocab_parallel=split, chunk_size=4).backward()
        assert gathered == [((1, 11, rows), torch.float32) for rows in (4, 4, 2)]
    finally:
        dist.destroy_process_group()


def test_gpu_launch_configurations(monkeypatch):
    """docs/kernels.md: the tiled path's tiles (64 x 128 x 64 for a plain 16-bit head, 64 x 64 x 32 with LoRA,
    softcap or fp32) and forward splits (about two programs per SM), the
    row kernel's tiles (at most 4096 columns, 4-8 warps, several rows per program up to 1024 columns), the
    16-bit gradient filter 2**-12, LoRA ranks up to 128."""
    from fastmtt.kernels import fused_linear_mtt_loss as tiled
    from fastmtt.kernels import lora_linear as lora
    from fastmtt.kernels import mtt_loss as rows

    from fastmtt import options
    monkeypatch.setattr(tiled, "interpreting", lambda: False)
    monkeypatch.setattr(rows, "interpreting", lambda: False)
    monkeypatch.setattr(tiled, "sm_count", lambda device: 132)
    size = (8192, 128256, 4096, 16)
    assert tiled._config(*size, dtype=torch.bfloat16)[:3] == (64, 128, 64)
    for kind in (dict(dtype=torch.bfloat16, lora=True), dict(dtype=torch.bfloat16, softcap=True),
                 dict(dtype=torch.float32)):
        assert tiled._config(*size, **kind)[:3] == (64, 64, 32)
    for n_rows in (64, 1024, 8192):
        splits, _ = tiled._split_columns(n_rows, 128256, 64, 128, torch.device("cuda"), None)
        assert splits * -(-n_rows // 64) >= 0.9 * 2 * 132  # about two programs per SM (whole tiles per split)
    assert {rows._block_sizes(v)[1] for v in (128256, 32000, 2048)} == {2048, 4096}
    assert {rows._block_sizes(v)[2] for v in (128256, 512, 128)} == {4, 8}
    assert rows._block_sizes(1024)[0] > 1 and rows._block_sizes(2048)[0] == 1
    assert options.DEFAULT_GRAD_THRESHOLD == 2**-12
    assert lora.MAX_RANK == 128


def test_auto_without_triton_runs_pytorch_and_warns_once(monkeypatch):
    """docs/api.md, docs/kernels.md: without triton installed, "auto" on CUDA tensors runs PyTorch and warns once."""
    import warnings

    from fastmtt import _dispatch

    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    _dispatch._warn_no_triton.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _dispatch.resolve_backend("auto", _tensor_on("cuda")) == "torch"
        assert _dispatch.resolve_backend("auto", _tensor_on("cuda")) == "torch"
    assert [str(w.message).split(":")[0] for w in caught] == ["fastmtt"]
    _dispatch._warn_no_triton.cache_clear()
