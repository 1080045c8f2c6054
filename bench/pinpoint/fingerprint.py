"""Fingerprints: order-free integer digests of tensor contents, for comparing runs without keeping copies.

Fingerprints are integer arithmetic over the bit patterns, on the tensor's device (details in
:class:`Fingerprints`). CPU: the bytes are read as int64 words twice, from byte 0 and from byte 4, and
each reading is dotted with seeded random int64 coefficients (sums wrap modulo 2^64); CUDA: the bytes
as 32/16/8-bit words widened to int64, times the coefficients, summed. Integer addition modulo 2^64 is
associative, so no reduction order changes a fingerprint: it is deterministic. Dtype and shape are
compared exactly; on the CPU, tensors of at most 256 bytes are compared by their bytes. *Collision probability*:
for two tensors that differ, with coefficients uniform over Z/2^64 and independent of the data, the
fingerprints agree with probability 2^(v-64), v the lowest differing bit position of the word that
holds it; every bit lies below bit 32 of a word in one of the two CPU readings (or in the 12 tail
bytes kept exactly), so this is at most 2^-33 per compared tensor (on CUDA: 2^-33 for 4- and 8-byte
dtypes, 2^-49 for bf16/fp16, 2^-57 for 1-byte), and 2^-64 for differences in the last mantissa bit
(:data:`COLLISION_BOUND`). The outputs of order-free ops are not read at all: they are described
*symbolically* by (op, the descriptors of its inputs, its scalar arguments), which is exact - equal
descriptors mean equal contents. ``exact=True`` keeps a CPU copy of every tensor instead.

Cost: a tensor is fingerprinted once per version (:meth:`Fingerprints.cached`). On the CPU the two
readings cost about one int64 multiply-add per 4 bytes (numpy on aligned words, ``torch.dot`` on large
unaligned ones); on CUDA a fingerprint is one multiply (widening by type promotion) and one integer sum
per chunk, resolved with one synchronisation at the end (:meth:`Fingerprints.resolver`). The random
coefficients (:class:`Coefficients`) are drawn on demand - about 0.5 ms per 2^16 words on the CPU, so
up to ~70 ms for the two full CPU lanes - and live as long as the object that drew them: one per
:class:`Fingerprints` unless one is passed in (``compare_runs`` shares one across its runs; a caller
fingerprinting every step can keep one for the run). Nothing is cached for the process.
"""

from __future__ import annotations

import hashlib
import struct
import weakref
from typing import Any, Callable

import numpy as np
import torch

from bench.compare import bits
from bench.pinpoint.ops import _tensors, read_back

FP_SEED = 0x5EED_DE7B
FP_CHUNK = 1 << 22          # 64-bit words per fingerprint chunk (32 MiB of int64 coefficients per device)
_FP_BLOCK = 1 << 16         # coefficients are drawn in blocks, each from its own seed: stable prefixes
FP_SMALL = 256              # tensors of at most this many bytes are kept as their bytes (exact)
_NUMPY_WORDS = 1 << 14      # unaligned CPU words: numpy up to this many (128 KiB), torch.dot above
_CPU = torch.device("cpu")
MAX_SYMBOLIC_DEPTH = 48     # longer chains of order-free ops are cut by fingerprinting the value

VALUE_KINDS = frozenset({"b", "h", "d", "x"})


class Coefficients:
    """The seeded random int64 coefficients fingerprints are dotted with, drawn on demand.

    One vector per (device, lane), grown by whole blocks up to the longest request (at most
    ``FP_CHUNK`` words, 32 MiB); block b of lane l is drawn from seed FP_SEED + l * 2^40 + b, so every
    object holds the same values and a longer vector starts with the shorter one. Kept until this
    object is dropped.
    """

    def __init__(self) -> None:
        self.vectors: dict[tuple, torch.Tensor] = {}   # (device, lane) -> coefficients drawn so far
        self.cpu_numpy: list = [None, None]            # CPU vectors of lanes 0 and 1, as numpy views

    def get(self, device: torch.device, lane: int, n: int) -> torch.Tensor:
        """The first ``n`` coefficients of ``lane`` on ``device``."""
        key = (device, lane)
        c = self.vectors.get(key)
        if c is None or c.numel() < n:
            have = 0 if c is None else c.numel() // _FP_BLOCK
            more = _coefficient_blocks(device, lane, have, -(-n // _FP_BLOCK))
            c = self.vectors[key] = more if c is None else torch.cat([c, more])
        return c[:n]

    def numpy(self, lane: int, n: int):
        """The CPU coefficients of ``lane`` as a numpy array of at least ``n`` words (a view of the torch
        vector, kept so that the hot path slices numpy only)."""
        c = self.cpu_numpy[lane]
        if c is None or c.size < n:
            c = self.cpu_numpy[lane] = self.get(_CPU, lane, n).numpy()
        return c


class Fingerprints:
    """Descriptors of tensor contents for one traced run.

    ==========  ===================================================================================
    ``b``       the bytes themselves (tensors of at most ``FP_SMALL`` bytes): exact
    ``h``       CPU: two int64 dot products of the bytes read as 64-bit words, one at byte offset 0
                and one at byte offset 4, with seeded random coefficients, plus the last 12 bytes.
                Every bit of the tensor sits below bit 32 of a word in one of the two (or in the
                tail), so for differing tensors the chance that both sums still agree is <= 2^-33.
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

    # -- value fingerprints -----------------------------------------------------------------
    def _cpu_dots(self, arr, offset: int, lane: int) -> tuple[int, ...]:
        """Dot products of the bytes of ``arr`` from ``offset`` on, read as int64 words, with lane ``lane``'s
        coefficients, one per chunk of FP_CHUNK words. numpy on aligned words and on small unaligned
        ones (least overhead per call); torch.dot on large unaligned ones (numpy copies those)."""
        count = (arr.nbytes - offset) >> 3
        words = arr[offset:offset + 8 * count].view(np.int64)
        if count <= FP_CHUNK:
            c = self.coefficients.numpy(lane, count)
            if offset == 0 or count <= _NUMPY_WORDS:
                return (int(np.dot(words, c[:count])),)
            return (int(torch.dot(torch.from_numpy(words), torch.from_numpy(c[:count]))),)
        out = []
        for start in range(0, count, FP_CHUNK):
            w = words[start:start + FP_CHUNK]
            c = self.coefficients.numpy(lane, w.size)[:w.size]
            out.append(int(np.dot(w, c)) if offset == 0 else int(torch.dot(torch.from_numpy(w), torch.from_numpy(c))))
        return tuple(out)

    def value(self, t: torch.Tensor) -> tuple:
        """A value descriptor of ``t`` (exact bytes, fingerprint or exact copy)."""
        t = t.detach()
        head = (str(t.dtype), tuple(t.shape))
        if self.exact:
            self.copies.append(t.to("cpu", copy=True))
            return ("x",) + head + (len(self.copies) - 1,)
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.device.type == "cpu":
            n = t.numel() * t.element_size()
            if n <= FP_SMALL:
                return ("b",) + head + (t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if n else b"",)
            arr = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            return ("h",) + head + (self._cpu_dots(arr, 0, 0), self._cpu_dots(arr, 4, 1), arr[-12:].tobytes())
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
            values.append(torch.mul(w, self.coefficients.get(w.device, 0, w.numel())).sum())
            idx.append(len(values) - 1)
        return ("d",) + head + (tuple(idx),)

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

    def describe(self, t) -> tuple:
        """The descriptor of ``t``'s current contents (cached while ``t`` is unchanged)."""
        if not isinstance(t, torch.Tensor):
            return ("s", _scalar_key(t))
        d = self.cached(t)
        if d is not None:
            return d
        if self.on_read is not None:
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


def _coefficient_blocks(device: torch.device, lane: int, start: int, stop: int) -> torch.Tensor:
    """Blocks ``start`` to ``stop`` (2^16 int64 coefficients each) of one lane; block b is drawn from seed
    FP_SEED + lane * 2^40 + b (the same tensor gets the same fingerprint, whatever object draws them)."""
    parts = [torch.randint(-2 ** 63, 2 ** 63 - 1, (_FP_BLOCK,), dtype=torch.int64,
                           generator=torch.Generator().manual_seed(FP_SEED + (lane << 40) + b))
             for b in range(start, stop)]
    return torch.cat(parts).to(device)


def fingerprints(tensors, coefficients: Coefficients | None = None) -> list:
    """Comparable fingerprints of ``tensors`` (``None`` stays ``None``), with the collision bound of
    :class:`Fingerprints`; one device synchronisation for all of them. Pass ``coefficients`` (a
    :class:`Coefficients` kept by the caller) to draw them once for many calls."""
    fp = Fingerprints(exact=False, coefficients=coefficients)
    with torch.no_grad():
        descs = [None if t is None else fp.value(t) for t in tensors]
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
