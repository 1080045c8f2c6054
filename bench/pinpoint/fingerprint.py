"""Fingerprints: order-free integer digests of tensor contents, for comparing runs without keeping copies.

Fingerprints are integer arithmetic over the bit patterns, on the tensor's device (details in
:class:`Fingerprints`). CPU: the bytes are read as int64 words twice, from byte 0 and from byte 4, and
each reading is dotted with the same seeded random int64 coefficients (sums wrap modulo 2^64); CUDA:
the bytes as 32/16/8-bit words widened to int64, times the coefficients, summed. Integer addition
modulo 2^64 is associative, so no reduction order changes a fingerprint: it is deterministic. Dtype
and shape are compared exactly; on the CPU, tensors of at most 256 bytes are compared by their bytes.

*Collision probability*: for two tensors that differ, with coefficients uniform over Z/2^64 and
independent of the data, a dot product sum(c_i * d_i) of the word differences d_i is 0 modulo 2^64
with probability at most 2^(v-64), v the lowest differing bit position of the words (fix every
coefficient but that of a word differing at bit v: at most 2^v of the 2^64 values of the last one
cancel the rest). On the CPU every bit of the tensor lies below bit 32 of a word in one of the two
readings (or in the last 12 bytes, kept exactly): a difference in the lower half of an aligned word
has v < 32 in the first reading; otherwise the lower halves all agree and a differing upper half is
the lower half of a word of the second reading. One reading suffices in each case, so both use the
same coefficients, and the two sums agree with probability at most 2^-33 per compared tensor (on
CUDA: 2^-33 for 4- and 8-byte dtypes, 2^-49 for bf16/fp16, 2^-57 for 1-byte), 2^-64 for differences
in the last mantissa bit (:data:`COLLISION_BOUND`; ``tests/test_pinpoint_cost.py`` checks the
argument on words built to cancel). The outputs of order-free ops are not read at all: they are
described *symbolically* by (op, the descriptors of its inputs, its scalar arguments), which is exact
- equal descriptors mean equal contents. ``exact=True`` keeps a CPU copy of every tensor instead.

Cost: a tensor is fingerprinted once per version (:meth:`Fingerprints.cached`). On the CPU the tensor
is read from memory once: it is cut into pieces of 1 MiB, and both readings of a piece are dotted
while it is in the L2 cache (``np.einsum``, which neither copies unaligned words nor holds the GIL);
with more than one torch thread allowed, the pieces of a large tensor are shared out over that many
threads. On CUDA a fingerprint is one multiply (widening by type promotion) and one integer sum per
chunk, resolved with one synchronisation at the end (:meth:`Fingerprints.resolver`). The random
coefficients (:class:`Coefficients`) are drawn on demand - about 0.5 ms per 2^16 words on the CPU, so
up to ~35 ms for the full CPU vector - and live as long as the object that drew them: one per
:class:`Fingerprints` unless one is passed in (``compare_runs`` shares one across its runs; a caller
fingerprinting every step can keep one for the run). Nothing is cached for the process.
"""

from __future__ import annotations

import hashlib
import math
import struct
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch

from bench.compare import bits
from bench.pinpoint.ops import _tensors, array_flags, memory_order, read_back

FP_SEED = 0x5EED_DE7B
FP_CHUNK = 1 << 22          # 64-bit words per fingerprint chunk (32 MiB of int64 coefficients per device)
_FP_BLOCK = 1 << 16         # coefficients are drawn in blocks, each from its own seed: stable prefixes
FP_SMALL = 256              # tensors of at most this many bytes are kept as their bytes (exact)
_PIECE = 1 << 17            # CPU words per piece (1 MiB): both readings of a piece run while it is in L2
_EINSUM_WORDS = 1 << 13     # from this many words on np.einsum beats ndarray.dot (and never copies)
_THREAD_WORDS = 1 << 20     # CPU tensors from this many words (8 MiB) on are shared out over the torch threads
_MASK = (1 << 64) - 1
_CPU = torch.device("cpu")
MAX_SYMBOLIC_DEPTH = 48     # longer chains of order-free ops are cut by fingerprinting the value
# numpy has these dtypes: their bytes are read through numpy directly (others through a torch uint8 view)
_NUMPY_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
                           torch.int8, torch.uint8, torch.bool})
_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}   # checked for NaN while fingerprinted

VALUE_KINDS = frozenset({"b", "h", "d", "x"})


class Coefficients:
    """The seeded random int64 coefficients fingerprints are dotted with, drawn on demand.

    One vector per device, grown by whole blocks up to the longest request (at most ``FP_CHUNK``
    words, 32 MiB); block b is drawn from seed FP_SEED + b, so every object holds the same values and a
    longer vector starts with the shorter one. Kept until this object is dropped.
    """

    def __init__(self) -> None:
        self.vectors: dict[torch.device, torch.Tensor] = {}   # device -> coefficients drawn so far
        self.cpu_numpy = None                                 # the CPU vector as a numpy view

    def get(self, device: torch.device, n: int) -> torch.Tensor:
        """The first ``n`` coefficients on ``device``."""
        c = self.vectors.get(device)
        if c is None or c.numel() < n:
            have = 0 if c is None else c.numel() // _FP_BLOCK
            more = _coefficient_blocks(device, have, -(-n // _FP_BLOCK))
            c = self.vectors[device] = more if c is None else torch.cat([c, more])
        return c[:n]

    def numpy(self, n: int):
        """The CPU coefficients as a numpy array of at least ``n`` words (a view of the torch vector,
        kept so that the hot path slices numpy only)."""
        c = self.cpu_numpy
        if c is None or c.size < n:
            c = self.cpu_numpy = self.get(_CPU, n).numpy()
        return c


class Fingerprints:
    """Descriptors of tensor contents for one traced run.

    ==========  ===================================================================================
    ``b``       the bytes themselves (tensors of at most ``FP_SMALL`` bytes): exact
    ``h``       CPU: two int64 dot products of the bytes read as 64-bit words, one at byte offset 0
                and one at byte offset 4, with the same seeded random coefficients, plus the last 12
                bytes. Every bit of the tensor sits below bit 32 of a word in one of the two (or in
                the tail), so for differing tensors the chance that both sums still agree is <= 2^-33.
    ``d``       CUDA: the bytes as int32/int16/int8 words widened to int64, times seeded random
                coefficients, summed on the device (<= 2^-33, 2^-49, 2^-57)
    ``x``       exact mode: a CPU copy of the tensor
    ``v``       a view: the base's descriptor plus shape, strides and offset
    ``u``       uninitialised memory (``empty``): shape and dtype only
    ``f``       the output of an order-free op: (op, its inputs' descriptors, its scalar arguments)
    ``s``       a non-tensor value
    ==========  ===================================================================================

    Sums wrap modulo 2^64; integer addition is associative, so the reduction order of ``dot``/``sum``
    cannot change them.
    """

    def __init__(self, exact: bool, coefficients: Coefficients | None = None) -> None:
        self.exact = exact
        self.coefficients = Coefficients() if coefficients is None else coefficients
        self.device_values: list[torch.Tensor] = []   # 'd' fingerprints still on their device
        self.copies: list[torch.Tensor] = []          # 'x' copies
        self.cache: dict[int, tuple] = {}   # id(tensor) -> (weakref, version, descriptor)
        self.by_place: dict[tuple, tuple] = {}  # (address, dtype, shape, strides) -> the same entry
        self.pending: list = []             # (tensor, entry, place) written by the last mutating op
        self._sweep_at = 4096
        # Called with every tensor whose contents an *input* descriptor is made for afresh (not found in
        # the cache: no traced op described it) - what came in from outside the traced ops.
        self.on_read: Callable[[torch.Tensor], None] | None = None
        self._pool = None                   # threads for large CPU tensors, made on first use (close())

    def close(self) -> None:
        """Stop the threads fingerprinting large CPU tensors used (if any); the object stays usable."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()

    # -- value fingerprints -----------------------------------------------------------------
    def _cpu_sums(self, arr, floats=None) -> tuple[tuple, tuple, tuple[bool, bool] | None]:
        """The two readings' dot products (from byte 0 and from byte 4, as int64 words) of the bytes
        ``arr`` with the coefficients, one per chunk of FP_CHUNK words of each reading, modulo 2^64; and
        with ``floats`` (np.float32 or np.float64, the element type) whether they hold NaN or an
        infinity, checked piece by piece while the piece is in the cache (else None)."""
        nbytes = arr.nbytes
        n0 = nbytes >> 3
        n1 = (nbytes - 4) >> 3
        c = self.coefficients.numpy(min(n0, FP_CHUNK))
        if n0 <= _PIECE:  # one piece (most tensors): no bookkeeping
            return ((_dot(arr[:8 * n0].view(np.int64), c[:n0]) & _MASK,),
                    (_dot(arr[4:4 + 8 * n1].view(np.int64), c[:n1]) & _MASK,),
                    None if floats is None else array_flags(arr.view(floats)))
        starts = range(0, n0, _PIECE)

        def piece(start: int) -> tuple[int, int, bool]:
            stop = min(start + _PIECE, n0)
            stop1 = min(stop, n1)
            cc = c[start % FP_CHUNK:start % FP_CHUNK + stop - start]
            words = arr[8 * start:8 * stop]
            finite = True
            if floats is not None:
                values = words.view(floats)
                finite = math.isfinite(np.vdot(values, values))
            return (_dot(words.view(np.int64), cc), _dot(arr[8 * start + 4:8 * stop1 + 4].view(np.int64),
                                                          cc[:stop1 - start]), finite)

        threads = torch.get_num_threads()
        if threads > 1 and n0 >= _THREAD_WORDS:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(threads, thread_name_prefix="detbench-fingerprint")
            parts = list(self._pool.map(piece, starts))
        else:
            parts = [piece(start) for start in starts]
        chunks = -(-n0 // FP_CHUNK)
        sums0, sums1 = [0] * chunks, [0] * chunks
        for start, (a, b, _) in zip(starts, parts):  # integer sums: any order, the same result
            sums0[start // FP_CHUNK] += a
            sums1[start // FP_CHUNK] += b
        found = None
        if floats is not None:  # the pieces' floats, and the one float32 after the last whole word, if any
            finite = all(f for _, _, f in parts) and array_flags(arr[8 * n0:].view(floats)) == (False, False)
            found = (False, False) if finite else array_flags(arr.view(floats))
        return tuple(v & _MASK for v in sums0), tuple(v & _MASK for v in sums1), found

    def value(self, t: torch.Tensor) -> tuple:
        """A value descriptor of ``t`` (exact bytes, fingerprint or exact copy)."""
        return self.value_flags(t, False)[0]

    def value_flags(self, t: torch.Tensor, check: bool = True) -> tuple[tuple, tuple[bool, bool] | None]:
        """(:meth:`value`, and with ``check`` (NaN, infinity) of a float32/float64 CPU tensor, found while
        its bytes were read for the fingerprint; else None).

        A CPU tensor that covers its memory densely (contiguous, or with permuted dimensions, like a
        transposed gradient) is read in memory order, without a copy; the permutation is then part of
        the descriptor (the same values in another layout count as different). Others are copied."""
        t = t.detach()
        head = (str(t.dtype), tuple(t.shape))
        if self.exact:
            self.copies.append(t.to("cpu", copy=True))
            return ("x",) + head + (len(self.copies) - 1,), None
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.is_cpu:
            n = t.numel() * t.element_size()
            if n <= FP_SMALL:
                return ("b",) + head + (_cpu_bytes(t.contiguous()).tobytes(),), None
            dense = memory_order(t)
            layout = ()
            if dense is None:
                dense = t.contiguous()
            else:
                dense, perm = dense
                if perm is not None:
                    layout = (("memory order", perm),)
            arr = _cpu_bytes(dense)
            sums0, sums1, found = self._cpu_sums(arr, _NUMPY_FLOATS.get(t.dtype) if check else None)
            return ("h",) + head + (sums0, sums1, arr[-12:].tobytes()) + layout, found
        flat = t.contiguous().reshape(-1)
        size = flat.element_size()
        if flat.dtype == torch.bool or size == 1:
            words = flat.view(torch.int8)
        elif size == 2:
            words = flat.view(torch.int16)
        else:
            words = flat.view(torch.int32)
        idx = []
        values = self.device_values
        for start in range(0, max(words.numel(), 1), FP_CHUNK):
            w = words[start:start + FP_CHUNK]
            # One multiply (the narrow words are widened to int64 inside it, by type promotion) and one
            # integer sum per chunk; the scalars stay on the device until :meth:`resolver`.
            values.append(torch.mul(w, self.coefficients.get(w.device, w.numel())).sum())
            idx.append(len(values) - 1)
        return ("d",) + head + (tuple(idx),), None

    # -- the cache: tensor -> descriptor of its current contents ----------------------------
    def put(self, t: torch.Tensor, desc: tuple, written: bool = False) -> tuple:
        """Cache ``desc`` as the descriptor of ``t``'s current contents. ``written``: ``t`` was just
        written by the op being traced (see :meth:`settle`)."""
        try:
            version = t._version
        except Exception:  # inference tensors have no version counter: never cached
            return desc
        cache = self.cache
        entry = (weakref.ref(t), version, desc)
        cache[id(t)] = entry
        try:
            place = (t.data_ptr(), t.dtype, t.shape, t.stride())
            self.by_place[place] = entry
        except Exception:  # no storage (sparse, meta ...)
            place = None
        if written:
            self.pending.append((t, entry, place))
        if len(cache) > self._sweep_at:  # drop entries of tensors that are gone
            for key in [k for k, e in cache.items() if e[0]() is None]:
                del cache[key]
            for key in [k for k, e in self.by_place.items() if e[0]() is None]:
                del self.by_place[key]
            self._sweep_at = max(4096, 2 * len(cache))
        return desc

    def settle(self) -> None:
        """Re-key the entries of the tensors the last mutating op wrote to their bumped version.

        An in-place or ``out=`` op reaches the dispatch mode *before* autograd's ADInplaceOrView kernel
        bumps the written tensors' version counters (it bumps each once, after the op returns), so the
        entry :meth:`put` made is one version behind. This runs before the next lookup, when the op has
        returned: an entry whose tensor is exactly one version ahead is moved to that version (the
        bump); one that moved further was written again, untraced, and stays stale (described anew).
        """
        pending, self.pending = self.pending, []
        cache, by_place = self.cache, self.by_place
        for t, entry, place in pending:
            version = t._version
            if version != entry[1] + 1:
                continue
            bumped = (entry[0], version, entry[2])
            if cache.get(id(t)) is entry:
                cache[id(t)] = bumped
            if place is not None and by_place.get(place) is entry:
                by_place[place] = bumped

    def cached(self, t: torch.Tensor) -> tuple | None:
        """The cached descriptor of ``t``, if its contents are unchanged since it was made.

        A tensor is found by identity, or - for a different tensor object over the same memory, like
        a saved tensor unpacked in backward - by (address, dtype, shape, strides) while the tensor it
        was recorded for is still alive (so the memory cannot have been reused) and the shared version
        counter says neither was written since.
        """
        if self.pending:
            self.settle()
        entry = self.cache.get(id(t))
        try:
            if entry is not None and entry[0]() is t:
                return entry[2] if entry[1] == t._version else None
            entry = self.by_place.get((t.data_ptr(), t.dtype, t.shape, t.stride()))
            if entry is not None:
                alive = entry[0]()
                if alive is not None and entry[1] == alive._version == t._version:
                    return entry[2]
        except Exception:  # inference tensors (no version), tensors without storage
            return None
        return None

    def describe(self, t, read: bool = True) -> tuple:
        """The descriptor of ``t``'s current contents (cached while ``t`` is unchanged). ``read=False``:
        ``t`` is an output (not reported to :attr:`on_read`)."""
        if not isinstance(t, torch.Tensor):
            return ("s", _scalar_key(t))
        d = self.cached(t)
        if d is not None:
            return d
        if read and self.on_read is not None:
            self.on_read(t)
        return self.put(t, self.value(t))

    def describe_value(self, t: torch.Tensor, read: bool = True) -> tuple:
        """Like :meth:`describe`, but a symbolic or view descriptor is replaced by the value's.
        ``read=False``: ``t`` is an output (not reported to :attr:`on_read`)."""
        d = self.cached(t)
        if d is not None and d[0] in VALUE_KINDS:
            return d
        if d is None and read and self.on_read is not None:
            self.on_read(t)
        return self.put(t, self.value(t))

    def view(self, out, base) -> None:
        if not isinstance(base, torch.Tensor):
            return
        bdesc = self.describe(base)
        for o in _tensors(out):
            try:
                offset = o.storage_offset() - base.storage_offset()
                self.put(o, ("v", bdesc, tuple(o.shape), tuple(o.stride()), offset))
            except Exception:  # sparse / nested: described by value when used
                pass

    def uninitialised(self, out) -> None:
        for o in _tensors(out):
            self.put(o, ("u", str(o.dtype), tuple(o.shape)))

    # -- resolving descriptors to comparable digests -----------------------------------------
    def resolver(self) -> Callable[[tuple], Any]:
        """A function mapping a descriptor to a comparable key: value descriptors stand for themselves,
        symbolic, view, device and exact descriptors become 16-byte blake2b digests (equal contents <->
        equal keys, up to the fingerprint's collision bound and blake2b's 2^-128)."""
        dev = read_back(self.device_values)
        memo: dict[int, tuple] = {}
        copies = self.copies

        def digest(desc):
            kind = desc[0]
            if kind in ("b", "h", "s", "u"):
                return desc  # already plain, comparable values
            hit = memo.get(id(desc))
            if hit is not None and hit[0] is desc:
                return hit[1]
            h = hashlib.blake2b(digest_size=16)
            if kind == "f":
                h.update(repr((kind, desc[2], desc[4], [digest(child) for child in desc[3]])).encode())
            elif kind == "v":
                h.update(repr((kind, desc[2:], digest(desc[1]))).encode())
            elif kind == "d":
                h.update(repr(desc[:3] + (tuple(dev[i] for i in desc[3]),)).encode())
            elif kind == "x":
                h.update(repr(desc[:3]).encode())
                c = copies[desc[3]]
                if c.numel():
                    h.update(bits(c).contiguous().numpy().tobytes())
            else:
                h.update(repr(desc).encode())
            out = h.digest()
            memo[id(desc)] = (desc, out)
            return out

        return digest


def _coefficient_blocks(device: torch.device, start: int, stop: int) -> torch.Tensor:
    """Blocks ``start`` to ``stop`` (2^16 int64 coefficients each); block b is drawn from seed FP_SEED + b
    (the same tensor gets the same fingerprint, whatever object draws them)."""
    parts = [torch.randint(-2 ** 63, 2 ** 63 - 1, (_FP_BLOCK,), dtype=torch.int64,
                           generator=torch.Generator().manual_seed(FP_SEED + b))
             for b in range(start, stop)]
    return torch.cat(parts).to(device)


def _dot(words, coefficients) -> int:
    """sum(words * coefficients) of two int64 numpy arrays, wrapping modulo 2^64 (a Python int)."""
    if words.size < _EINSUM_WORDS:
        return int(words.dot(coefficients))
    return int(np.einsum("i,i->", words, coefficients))


def _cpu_bytes(t: torch.Tensor):
    """The bytes of a contiguous CPU tensor as a flat numpy uint8 array (a view, no copy)."""
    if t.dtype in _NUMPY_DTYPES:
        return t.numpy().reshape(-1).view(np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def fingerprints(tensors, coefficients: Coefficients | None = None) -> list:
    """Comparable fingerprints of ``tensors`` (``None`` stays ``None``), with the collision bound of
    :class:`Fingerprints`; one device synchronisation for all of them. Pass ``coefficients`` (a
    :class:`Coefficients` kept by the caller) to draw them once for many calls."""
    fp = Fingerprints(exact=False, coefficients=coefficients)
    try:
        with torch.no_grad():
            descs = [None if t is None else fp.value(t) for t in tensors]
    finally:
        fp.close()
    digest = fp.resolver()
    return [None if d is None else digest(d) for d in descs]


def _scalar_key(x):
    if isinstance(x, float):
        return ("f", struct.pack("<d", x))
    if isinstance(x, (bool, int, str)) or x is None:
        return (type(x).__name__, x)
    if isinstance(x, (list, tuple)):
        return tuple(_scalar_key(v) for v in x)
    return (type(x).__name__, repr(x))


COLLISION_BOUND = ("fingerprints of differing tensors collide with probability <= 2^(v-64), v the lowest differing "
                   "bit of a word: <= 2^-33 (float32), 2^-49 (bf16/fp16), 2^-57 (1-byte), 2^-64 for last-bit "
                   "differences; per compared tensor")
