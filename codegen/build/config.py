"""Tile configurations of the SM90 grouped GEMM: the one place that names and checks them."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from mxfp4.format.layout import ATOM_BYTES, ATOM_K, ATOM_N

# Hopper: 228 KB of shared memory per SM, of which one CTA may use 227 KB dynamically; the
# runtime reserves 1 KB per resident CTA.
MAX_SHARED_MEMORY = 227 * 1024
SHARED_MEMORY_PER_SM = 228 * 1024
RESERVED_SHARED_MEMORY_PER_CTA = 1024
MAX_THREADS_PER_SM = 2048
# The kernel keeps a per-expert prefix sum of m-tiles in shared memory.
MAX_EXPERTS = 1024
BARRIER_BYTES = 8
STREAM_K_FLAG_BYTES = 16  # one int per consumer warpgroup (SharedStorage::last_share)
SMEM_ALIGN = 1024  # 128-byte-swizzled TMA destinations need 1024-byte alignment
REGISTERS_PER_SM = 65536
PRODUCER_REGISTERS = 40  # setmaxnreg of the producer warpgroup

# The legal ranges of the config fields, declared once: validation, the CLI help and the tuning
# search space all read these.
WARPGROUP_CHOICES = (1, 2, 3, 4)  # consumer warpgroups per CTA
TILE_M_RANGE = (8, 256)  # WGMMA's N, in steps of 8
MMA_ROWS_SPLITS = (2, 4, 8)  # tile_m / mma_rows: the narrow WGMMAs' widths are mma_rows x 1, 2, 4, ... (powers of 2)
MAX_TILE_K = 512  # the decode loop is unrolled over a stage
MAX_ATOMS_PER_WARPGROUP = 4  # 64-row blocks of W per consumer warpgroup
MIN_STAGES = 2
EPILOGUES = ("store", "swiglu", "scatter")  # templates/mxfp4_epilogue.cuh: Store, SwiGLU, ScaleScatter
CTAS_PER_SM_CHOICES = (1, 2, 3, 4, 5, 6)  # resident CTAs per SM (light CTAs hide decode latency at small M)
# Who issues the TMA loads: a whole producer warpgroup (setmaxnreg hands its registers to the
# consumers) or a single producer warp beside the consumers (no setmaxnreg; a CTA of 128 x wg + 32
# threads, so more light CTAs fit on an SM).
PRODUCERS = ("warpgroup", "warp")
PRODUCER_WARP_THREADS = 32
# Kernel families by activation type: bf16 (W4A16: E2M1 decoded to bf16, BF16 WGMMA k16) or fp8 (W4A8: e4m3
# activations with a row scale, the FP8-ready weight layout decoded to e4m3, FP8 WGMMA k32).
ACTIVATIONS = ("bf16", "fp8")
FP8_TILE_K = 128  # W4A8: x (1 byte per value) arrives by TMA in 128-byte (128-value) swizzled rows
# Register buffers of decoded A fragments per consumer warpgroup: F buffers keep F - 1 WGMMA chunks in flight
# while the next chunk decodes (templates/mxfp4_grouped_mm_sm90.cuh, consume_stage). 2 is the original kernel.
FRAGMENT_BUFFER_CHOICES = (2, 3)
DEFAULT_FRAGMENT_BUFFERS = 2
# With more than two buffers, ptxas (CUDA 13.0 and NVRTC 13.5) serializes every WGMMA of the kernel ("insufficient
# register resources for the wgmma pipeline") once a stage holds more weight atoms than this (tile_n / 64 x
# tile_k / 64): n256_k256 and n128_k512 do, n256_k128 and n128_k256 do not (measured on every such config the sweep
# tries; tests/test_compile.py checks the ones under test).
MAX_STAGE_ATOMS_DEEP_FRAGMENTS = 8
# How the Store and ScaleScatter epilogues write a tile (templates/mxfp4_epilogue.cuh, StoreMode; NOTES, ninth
# session): whole 128-byte lines through a shared-memory staging area for tiles LINE_STORES_MIN_TILE_M rows tall or
# more where the area fits, 16-byte stores that fill whole sectors for tiles SECTOR_STORES_MIN_TILE_M or more, the
# paired 4-byte stores for the decode tiles (their output is small) and for SwiGLU (a warp holds half a sector).
STORE_PATHS = ("paired", "sectors", "lines")
SECTOR_STORES_MIN_TILE_M = 64
LINE_STORES_MIN_TILE_M = 128
# The epilogue's staging geometry, rendered into every kernel (codegen/build/render.py, STAGING_CONSTANTS) and read
# by templates/mxfp4_line_stores.cuh: this is its one home.
LINE_STAGE_ROWS = 32  # rows of a warpgroup's 64-column block staged at once
LINE_STAGE_PITCH = 144  # bytes per staged row: 128 of values, 16 of pad (no bank conflicts)
LINE_STAGE_BYTES_PER_WARPGROUP = LINE_STAGE_ROWS * LINE_STAGE_PITCH

_NAME = re.compile(
    r"^n(\d+)_m(\d+)_k(\d+)_s(\d+)_wg(\d+)(?:_c(\d+))?(_pw)?(_sk)?(?:_f(\d+))?(_pp)?(?:_r(\d+))?(?:_(fp8))?"
    r"(?:_(swiglu|scatter))?$"
)


@dataclass(frozen=True, order=True)
class TileConfig:
    """One kernel variant. The kernel computes ``out^T tile = W tile . x tile^T``.

    tile_n      weight rows (N) per CTA; a multiple of 64 split over the consumer warpgroups.
    tile_m      tokens (rows of x) per CTA: WGMMA's N, a multiple of 8 in 8..256.
    tile_k      K per pipeline stage, a multiple of 64 (one packed atom is 64 deep).
    stages      depth of the TMA -> shared memory pipeline.
    warpgroups  consumer warpgroups (each owns tile_n / warpgroups rows); one more produces.
    ctas_per_sm CTAs resident on each SM (the grid is SMs x ctas_per_sm); shared memory and
                registers are sized so that they fit together. Names add ``_c<n>`` when n > 1.
    epilogue    what the consumers do with the accumulators: "store" (the grouped GEMM), "swiglu" (gpt-oss
                gate_up: bias + clamped SwiGLU on pack-time-paired gate/up rows) or "scatter" (MoE down:
                bias, routing weight, rows back in token order). Names add ``_<epilogue>`` unless "store".
    producer    "warpgroup" (a producer warpgroup that gives its registers to the consumers) or "warp"
                (one producer warp beside them; names add ``_pw``).
    stream_k    split the K loop of all tiles evenly over the persistent grid (stream-K): every CTA
                gets the same number of k-steps, so the last wave is never part-empty; a tile split
                between CTAs is summed in k order by the one that finishes it last (deterministic).
                Names add ``_sk``.
    activations the kernel family: "bf16" (W4A16) or "fp8" (W4A8: e4m3 x with one scale per row, weights in
                the FP8-ready layout decoded to e4m3, FP8 WGMMA; tile_k a multiple of 128). Names add ``_fp8``
                (before the epilogue's suffix).
    fragment_buffers
                register buffers of decoded weight fragments per consumer warpgroup: each warpgroup keeps
                fragment_buffers - 1 WGMMA chunks (64 deep) in flight while it decodes the next. 2 is the original
                kernel; 3 needs tile_k >= 128 (the previous stage's slot is released after the stage's second chunk).
                Names add ``_f<n>`` unless 2 (after ``_sk``, before ``_fp8``).
    pingpong    the two consumer warpgroups own whole tiles and take turns (the CTA's tiles 0, 2, ... and 1, 3, ...):
                one stores its tile while the other's WGMMAs run, instead of both storing while the tensor cores
                idle. Each warpgroup holds the whole tile_n x tile_m accumulator block. Needs warpgroups=2, no
                stream-K. Names add ``_pp`` (after ``_f<n>``, before ``_fp8``).
    mma_rows    0 (WGMMA's N is tile_m), or the rows of x one narrow WGMMA takes: a tile of tile_m rows issues
                WGMMAs of N = p x mma_rows, p the smallest power of two whose rows cover the tile's valid rows, and
                loads only those rows of x. So an expert with many rows (skewed routing) decodes its weights once
                per tile_m rows while one with few pays no wider WGMMA. tile_m / mma_rows is 2, 4 or 8; no
                stream-K or ping-pong. Names add ``_r<n>`` (after ``_pp``, before ``_fp8``).
    """

    tile_n: int = 128
    tile_m: int = 64
    tile_k: int = 128
    stages: int = 4
    warpgroups: int = 2
    ctas_per_sm: int = 1
    epilogue: str = "store"
    producer: str = "warpgroup"
    stream_k: bool = False
    activations: str = "bf16"
    fragment_buffers: int = DEFAULT_FRAGMENT_BUFFERS
    pingpong: bool = False
    mma_rows: int = 0

    @property
    def name(self) -> str:
        suffix = f"_c{self.ctas_per_sm}" if self.ctas_per_sm != 1 else ""
        suffix += "_pw" if self.producer == "warp" else ""
        suffix += "_sk" if self.stream_k else ""
        suffix += f"_f{self.fragment_buffers}" if self.fragment_buffers != DEFAULT_FRAGMENT_BUFFERS else ""
        suffix += "_pp" if self.pingpong else ""
        suffix += f"_r{self.mma_rows}" if self.mma_rows else ""
        suffix += "_fp8" if self.activations == "fp8" else ""
        suffix += f"_{self.epilogue}" if self.epilogue != "store" else ""
        return f"n{self.tile_n}_m{self.tile_m}_k{self.tile_k}_s{self.stages}_wg{self.warpgroups}{suffix}"

    @classmethod
    def from_name(cls, name: str) -> "TileConfig":
        match = _NAME.match(name)
        if match is None:
            raise ValueError(
                f"config name {name!r} is not of the form "
                "n<tile_n>_m<tile_m>_k<tile_k>_s<stages>_wg<warpgroups>[_c<ctas_per_sm>][_pw][_sk][_f<fragment_buffers>][_pp]"
                "[_r<mma_rows>][_fp8]"
                "[_swiglu|_scatter]"
            )
        *numbers, ctas, producer_warp, stream_k, buffers, pingpong, mma_rows, fp8, epilogue = match.groups()
        config = cls(
            *(int(v) for v in numbers), ctas_per_sm=int(ctas or 1), epilogue=epilogue or "store",
            producer="warp" if producer_warp else "warpgroup", stream_k=bool(stream_k), activations=fp8 or "bf16",
            fragment_buffers=int(buffers or DEFAULT_FRAGMENT_BUFFERS), pingpong=bool(pingpong),
            mma_rows=int(mma_rows or 0),
        )
        config.validate()
        return config

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)

    @property
    def family(self) -> str:
        """The kernel family in words (``mxfp4.explain`` prints it)."""
        if self.ctas_per_sm > 1:
            shape = f"decode: {self.ctas_per_sm} light CTAs per SM, {self.warpgroups} consumer warpgroup(s) each"
        else:
            shape = f"warp-specialized: one CTA per SM, {self.warpgroups} consumer warpgroup(s)"
        shape += ", a producer warp" if self.producer == "warp" else ""
        shape += ", stream-K" if self.stream_k else ""
        shape += ", ping-pong (the consumer warpgroups take whole tiles in turns)" if self.pingpong else ""
        if self.mma_rows:
            shape += f", WGMMAs {self.mma_rows} to {self.tile_m} rows wide as the tile's rows need"
        if self.fragment_buffers != DEFAULT_FRAGMENT_BUFFERS:
            shape += f", {self.fragment_buffers} fragment buffers ({self.fragment_buffers - 1} WGMMA chunks in flight)"
        if self.activations == "fp8":
            shape = f"W4A8 (e4m3 activations with row scales, E2M1 decoded to e4m3, FP8 WGMMA), {shape}"
        return shape if self.epilogue == "store" else f"{shape}, {self.epilogue} epilogue"

    # Derived quantities the template and the launcher share.
    @property
    def atoms_per_warpgroup(self) -> int:
        """64-row WGMMA blocks of W each consumer warpgroup owns (ping-pong: all of its tile's)."""
        return self.tile_n // (ATOM_N * (1 if self.pingpong else self.warpgroups))

    @property
    def k_atoms_per_stage(self) -> int:
        return self.tile_k // ATOM_K

    def k_steps(self, k_atoms: int) -> int:
        """Pipeline stages (k-steps) of one tile when K spans ``k_atoms`` packed atoms."""
        return -(-k_atoms // self.k_atoms_per_stage)

    @property
    def producer_threads(self) -> int:
        return PRODUCER_WARP_THREADS if self.producer == "warp" else 128

    @property
    def threads(self) -> int:
        return 128 * self.warpgroups + self.producer_threads

    @property
    def x_element_bytes(self) -> int:
        return 1 if self.activations == "fp8" else 2

    @property
    def fragment_registers(self) -> int:
        """A-fragment registers per 64-row block: ``fragment_buffers`` buffers of 4 registers per WGMMA step of
        an atom (4 k16 steps for bf16: 16 per buffer; 2 k32 steps for fp8: 8 per buffer)."""
        return self.fragment_buffers * 4 * (ATOM_K // (16 if self.activations == "bf16" else 32))

    @property
    def mma_widths(self) -> tuple[int, ...]:
        """The WGMMA N a tile may issue with: tile_m alone, or mma_rows x 1, 2, 4, ... up to tile_m."""
        if not self.mma_rows:
            return (self.tile_m,)
        return tuple(self.mma_rows << p for p in range((self.tile_m // self.mma_rows).bit_length()))

    @property
    def x_box_rows(self) -> int:
        """Rows of x per TMA box (the x map's box height): one narrow WGMMA's rows with mma_rows, else tile_m."""
        return self.mma_rows or self.tile_m

    @property
    def x_stage_bytes(self) -> int:
        return self.tile_m * self.tile_k * self.x_element_bytes

    @property
    def w_stage_bytes(self) -> int:
        return (self.tile_n // ATOM_N) * self.k_atoms_per_stage * ATOM_BYTES

    @property
    def shared_memory_bytes(self) -> int:
        """Dynamic shared memory: the line stores' staging areas (if any), pipeline stages, barriers and the expert
        tile table."""
        return self.line_stage_bytes + self._pipeline_shared_memory_bytes

    @property
    def _pipeline_shared_memory_bytes(self) -> int:
        stage = self.x_stage_bytes + self.w_stage_bytes
        barriers = 2 * self.stages * BARRIER_BYTES
        table = 4 * (MAX_EXPERTS + 1)
        return SMEM_ALIGN + self.stages * stage + barriers + STREAM_K_FLAG_BYTES + table

    @property
    def store_path(self) -> str:
        """How the epilogue writes a tile, one of STORE_PATHS (the kernel falls back to the paired stores at run
        time where 16-byte stores do not fit the output: odd column counts, unaligned rows)."""
        if self.epilogue == "swiglu" or self.tile_m < SECTOR_STORES_MIN_TILE_M or self.tile_m % 16:
            return "paired"
        fits = self._pipeline_shared_memory_bytes + self.line_stage_area <= self.max_shared_memory_bytes
        if self.tile_m >= LINE_STORES_MIN_TILE_M and self.tile_m % 32 == 0 and fits:
            return "lines"
        return "sectors"

    @property
    def line_stage_bytes(self) -> int:
        """The line stores' staging areas before the ring (one per consumer warpgroup, whole 1024-byte blocks so
        that the ring's TMA boxes stay aligned); 0 unless store_path is "lines"."""
        return self.line_stage_area if self.store_path == "lines" else 0

    @property
    def line_stage_area(self) -> int:
        """Bytes of the line stores' staging areas for this config's consumer warpgroups, reserved or not."""
        return -(-self.warpgroups * LINE_STAGE_BYTES_PER_WARPGROUP // SMEM_ALIGN) * SMEM_ALIGN

    @property
    def max_shared_memory_bytes(self) -> int:
        """What one CTA may use when ``ctas_per_sm`` of them share an SM."""
        share = SHARED_MEMORY_PER_SM // self.ctas_per_sm - RESERVED_SHARED_MEMORY_PER_CTA
        return min(MAX_SHARED_MEMORY, share)

    @property
    def launch_registers(self) -> int:
        """Registers per thread at launch: what __launch_bounds__(threads, ctas_per_sm) allows, in steps of 8."""
        return min(256, REGISTERS_PER_SM // (self.threads * self.ctas_per_sm) // 8 * 8)

    @property
    def uses_setmaxnreg(self) -> bool:
        """A producer warpgroup hands registers to the consumers; a producer warp cannot (setmaxnreg
        works on whole warpgroups), so every thread keeps the launch allocation."""
        return self.producer == "warpgroup"

    @property
    def consumer_registers(self) -> int:
        """Registers of each consumer thread: with a producer warpgroup, setmaxnreg's request (the
        launch pool less the producer's, in steps of 8); with a producer warp, the launch allocation.

        setmaxnreg.inc waits until the CTA's pool has the registers, so asking for more than the
        launch allocation freed by the producer would hang the kernel.
        """
        if not self.uses_setmaxnreg:
            return self.launch_registers
        pool = self.launch_registers * self.threads - 128 * PRODUCER_REGISTERS
        return min(256, pool // (128 * self.warpgroups) // 8 * 8)

    def register_pool_suffices(self, launch_registers: int) -> bool:
        """Whether a kernel launched with ``launch_registers`` per thread (ptxas's count) leaves
        the pool that the setmaxnreg requests need; if not, setmaxnreg.inc would wait forever."""
        if not self.uses_setmaxnreg:
            return True
        needed = 128 * PRODUCER_REGISTERS + 128 * self.warpgroups * self.consumer_registers
        return launch_registers * self.threads >= needed

    @property
    def accumulators_per_thread(self) -> int:
        return self.atoms_per_warpgroup * self.tile_m // 2

    def validate(self) -> "TileConfig":
        """Raise ValueError with the reason when the kernel cannot be built for this config."""
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in ("epilogue", "activations", "producer"):
                choices = {"epilogue": EPILOGUES, "activations": ACTIVATIONS, "producer": PRODUCERS}[field.name]
                if value not in choices:
                    raise ValueError(f"{field.name}={value!r}: one of {choices}")
            elif field.name in ("stream_k", "pingpong"):
                if not isinstance(value, bool):
                    raise ValueError(f"{field.name} must be a bool, got {value!r}")
            elif field.name == "mma_rows":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"mma_rows must be 0 (off) or a positive int, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field.name} must be a positive int, got {value!r}")
        low, high = TILE_M_RANGE
        if self.tile_m % 8 or not low <= self.tile_m <= high:
            raise ValueError(f"tile_m={self.tile_m}: WGMMA's N must be a multiple of 8 in {low}..{high}")
        if self.tile_k % ATOM_K:
            raise ValueError(f"tile_k={self.tile_k}: must be a multiple of {ATOM_K} (the packed atom's depth)")
        if self.activations == "fp8" and self.tile_k % FP8_TILE_K:
            raise ValueError(f"tile_k={self.tile_k}: the fp8 family needs a multiple of {FP8_TILE_K} (x arrives in "
                             "128-byte swizzled rows of 128 e4m3 values)")
        if self.tile_k > MAX_TILE_K:
            raise ValueError(f"tile_k={self.tile_k}: at most {MAX_TILE_K} (the decode loop is unrolled over a stage)")
        if self.warpgroups not in WARPGROUP_CHOICES:
            raise ValueError(f"warpgroups={self.warpgroups}: one of {WARPGROUP_CHOICES} consumer warpgroups")
        self._validate_warpgroup_split()
        if self.atoms_per_warpgroup > MAX_ATOMS_PER_WARPGROUP:
            raise ValueError(f"tile_n={self.tile_n}: at most {MAX_ATOMS_PER_WARPGROUP} blocks of 64 rows per warpgroup")
        if self.ctas_per_sm not in CTAS_PER_SM_CHOICES:
            raise ValueError(f"ctas_per_sm={self.ctas_per_sm}: one of {CTAS_PER_SM_CHOICES}")
        if self.threads * self.ctas_per_sm > MAX_THREADS_PER_SM:
            raise ValueError(
                f"{self.ctas_per_sm} CTAs of {self.threads} threads exceed the SM's {MAX_THREADS_PER_SM} threads"
            )
        self._validate_fragment_buffers()
        self._validate_mma_rows()
        if self.stages < MIN_STAGES:
            raise ValueError(f"stages={self.stages}: the pipeline needs at least {MIN_STAGES} stages")
        if self.accumulators_per_thread > 128:
            raise ValueError(
                f"{ATOM_N * self.atoms_per_warpgroup} x {self.tile_m} rows per warpgroup needs "
                f"{self.accumulators_per_thread} fp32 accumulators per thread; at most 128 fit in registers"
            )
        # Accumulators + the buffers of A fragments + addressing.
        if self.accumulators_per_thread + self.fragment_registers * self.atoms_per_warpgroup + 40 > self.consumer_registers:
            raise ValueError(
                f"{self.accumulators_per_thread} accumulators and {self.fragment_registers * self.atoms_per_warpgroup} "
                f"A-fragment registers ({self.fragment_buffers} buffers) per thread do not fit in the "
                f"{self.consumer_registers} registers each of {self.warpgroups} consumer warpgroups gets"
            )
        if self.shared_memory_bytes > self.max_shared_memory_bytes:
            raise ValueError(
                f"{self.name} needs {self.shared_memory_bytes} bytes of shared memory per CTA, over the "
                f"{self.max_shared_memory_bytes} each of {self.ctas_per_sm} CTA(s) per SM can have on Hopper; "
                "use fewer stages, a smaller tile or fewer CTAs per SM"
            )
        return self

    def _validate_warpgroup_split(self) -> None:
        """tile_n splits into 64-row blocks per consumer warpgroup, or (ping-pong) each warpgroup takes whole tiles."""
        if self.pingpong and (self.warpgroups != 2 or self.stream_k):
            raise ValueError(f"pingpong: needs warpgroups=2 and no stream-K (got warpgroups={self.warpgroups}, "
                             f"stream_k={self.stream_k}): two warpgroups take whole tiles in turns")
        if self.tile_n % (ATOM_N * self.warpgroups) and not self.pingpong:
            raise ValueError(
                f"tile_n={self.tile_n}: must be a multiple of 64 x warpgroups = {ATOM_N * self.warpgroups}"
            )
        if self.tile_n % ATOM_N:
            raise ValueError(f"tile_n={self.tile_n}: must be a multiple of {ATOM_N}")

    def _validate_mma_rows(self) -> None:
        if not self.mma_rows:
            return
        if self.mma_rows % 8 or self.tile_m // self.mma_rows not in MMA_ROWS_SPLITS or self.tile_m % self.mma_rows:
            raise ValueError(f"mma_rows={self.mma_rows}: a multiple of 8 with tile_m / mma_rows one of "
                             f"{MMA_ROWS_SPLITS} (tile_m={self.tile_m})")
        if self.stream_k or self.pingpong:
            raise ValueError(f"mma_rows={self.mma_rows}: not with stream-K or ping-pong (stream_k={self.stream_k}, "
                             f"pingpong={self.pingpong})")

    def _validate_fragment_buffers(self) -> None:
        if self.fragment_buffers not in FRAGMENT_BUFFER_CHOICES:
            raise ValueError(f"fragment_buffers={self.fragment_buffers}: one of {FRAGMENT_BUFFER_CHOICES}")
        # A stage releases the previous stage's slot after its chunk fragment_buffers - 2, when wgmma.wait_group
        # has shown the previous stage's last chunk complete; a full stage must reach that chunk.
        if self.k_atoms_per_stage < self.fragment_buffers - 1:
            raise ValueError(
                f"fragment_buffers={self.fragment_buffers}: needs tile_k >= {ATOM_K * (self.fragment_buffers - 1)} "
                f"(got tile_k={self.tile_k}); a stage must hold {self.fragment_buffers - 1} chunks of {ATOM_K} so "
                "that the previous stage's shared-memory slot is released within it"
            )
        stage_atoms = (self.tile_n // ATOM_N) * self.k_atoms_per_stage
        if self.fragment_buffers > DEFAULT_FRAGMENT_BUFFERS and stage_atoms > MAX_STAGE_ATOMS_DEEP_FRAGMENTS:
            raise ValueError(
                f"fragment_buffers={self.fragment_buffers}: tile_n={self.tile_n} x tile_k={self.tile_k} is "
                f"{stage_atoms} weight atoms per stage, over the {MAX_STAGE_ATOMS_DEEP_FRAGMENTS} where ptxas keeps "
                "the WGMMAs pipelined (beyond, it serializes them); use a smaller tile_n or tile_k"
            )


# W4A16 first, then W4A8. Decode (few tokens per expert: memory-bound; three light CTAs per SM, each one consumer warpgroup, so
# that independent decode -> WGMMA chains hide each other's latency) to prefill (many tokens per
# expert: tensor-core bound, tile_m 256). From the H100 probes and sweeps (benchmarks/NOTES.md); the
# shipped tuning table refines the choice per shape.
DEFAULT_CONFIGS: tuple[TileConfig, ...] = (
    TileConfig(tile_n=128, tile_m=8, tile_k=128, stages=6, warpgroups=1, ctas_per_sm=3),
    TileConfig(tile_n=128, tile_m=16, tile_k=128, stages=5, warpgroups=1, ctas_per_sm=3),
    TileConfig(tile_n=128, tile_m=32, tile_k=256, stages=5, warpgroups=2),
    TileConfig(tile_n=128, tile_m=64, tile_k=128, stages=7, warpgroups=2),
    TileConfig(tile_n=128, tile_m=128, tile_k=128, stages=5, warpgroups=2),
    TileConfig(tile_n=128, tile_m=256, tile_k=64, stages=5, warpgroups=2),
    # W4A8 (activations="fp8"): the same shapes at half the x bytes per stage (deeper pipelines), tile_k 128.
    TileConfig(tile_n=128, tile_m=8, tile_k=128, stages=7, warpgroups=1, ctas_per_sm=3, activations="fp8"),
    TileConfig(tile_n=128, tile_m=16, tile_k=128, stages=6, warpgroups=1, ctas_per_sm=3, activations="fp8"),
    TileConfig(tile_n=128, tile_m=64, tile_k=128, stages=8, warpgroups=2, activations="fp8"),
    TileConfig(tile_n=128, tile_m=128, tile_k=128, stages=8, warpgroups=2, activations="fp8"),
    TileConfig(tile_n=128, tile_m=256, tile_k=128, stages=5, warpgroups=2, activations="fp8"),
)

for _config in DEFAULT_CONFIGS:
    _config.validate()
