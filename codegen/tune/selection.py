"""Which tile config a call runs: the shipped/user tuning table first, then a heuristic."""

from __future__ import annotations

from dataclasses import dataclass

from codegen.build.config import DEFAULT_CONFIGS, TileConfig


@dataclass(frozen=True)
class Selection:
    config: TileConfig
    reason: str


def configs_in_use() -> list[TileConfig]:
    """Every config the op can pick on its own: the defaults and the shipped tables' choices.

    The GPU tests, the sanitizer runs and the compile checks cover exactly these.
    """
    from .tables import shipped_configs

    return list(dict.fromkeys([*DEFAULT_CONFIGS, *shipped_configs()]))


# One config of each decode family the tuner can choose, picked by a table or not: a producer warp,
# stream-K on either producer, and a multi-warpgroup stream-K (one counter per warpgroup). Then three fragment
# buffers (two WGMMA chunks in flight while the next decodes; no table picks them yet): the prefill twins of the
# shipped n128_m256_k128_s5_wg2_fp8 and n128_m256_k128_s3_wg2, the M = 64 twins of n128_m64_k256_s4_wg2 (four chunks
# a stage) and n128_m64_k128_s8_wg2_fp8, and one with stream-K (units that start and end inside a tile's k loop).
# Then ping-pong of both families (the consumer warpgroups take whole 128 x 128 tiles in turns; no table picks them
# yet): their GPU cases give each CTA many tiles, so both warpgroups and the turns run.
FAMILY_SAMPLES: tuple[str, ...] = (
    "n64_m8_k128_s6_wg1_c5_pw", "n128_m8_k128_s6_wg1_c3_pw_sk", "n128_m16_k128_s5_wg1_c3_sk",
    "n64_m8_k128_s6_wg1_c5_pw_sk", "n128_m64_k128_s7_wg2_pw_sk",
    "n128_m256_k128_s5_wg2_f3_fp8", "n128_m256_k128_s3_wg2_f3", "n128_m64_k256_s4_wg2_f3",
    "n128_m64_k128_s8_wg2_f3_fp8", "n128_m64_k128_s7_wg2_pw_sk_f3",
    "n128_m128_k64_s8_wg2_pp", "n128_m128_k128_s8_wg2_pp_fp8",
    "n128_m64_k128_s4_wg1_c2_pw_r16", "n128_m64_k128_s6_wg1_c2_pw_r16_fp8", "n128_m128_k128_s4_wg2_r32",
)


def configs_under_test() -> list[TileConfig]:
    """What the GPU tests and the sanitizer run: every config in use and one of each family."""
    return list(dict.fromkeys([*configs_in_use(), *(TileConfig.from_name(name) for name in FAMILY_SAMPLES)]))


def heuristic_config(tokens_per_expert: int, activations: str = "bf16") -> TileConfig:
    """The default config of the ``activations`` family whose tile_m is the smallest that covers the tokens
    of one expert."""
    by_tile_m = sorted((c for c in DEFAULT_CONFIGS if c.activations == activations), key=lambda c: c.tile_m)
    if not by_tile_m:
        raise ValueError(f"no default config of activations={activations!r}")
    for config in by_tile_m:
        if tokens_per_expert <= config.tile_m:
            return config
    return by_tile_m[-1]


def select_config(num_experts: int, n: int, k: int, tokens_per_expert: int,
                  device_name: str | None = None, activations: str = "bf16", rows: int | None = None) -> Selection:
    """Pick the config for a call. ``tokens_per_expert`` is a host-side estimate (T / E, or max_m);
    ``activations`` the kernel family ("bf16": W4A16, "fp8": W4A8). ``rows``, where the host knows it (the MoE
    layer: T x top_k), is the call's row count: with fewer rows than experts at most ``rows`` experts have work,
    so a table entry tuned for ``rows`` experts of one row each fits the grid better than the full shape's (at
    T = 1 a top-4 layer reads 4 of 32 or 128 experts: far fewer tiles than the full shape's M = 1 entry assumed)."""
    if device_name is not None:
        from .tables import lookup  # the tables load on first use

        if rows is not None and 0 < rows < num_experts:
            found = lookup(device_name, rows, n, k, 1, activations)
            if found is not None:
                config, reason = found
                return Selection(config, f"{reason}; {rows} rows read at most {rows} of the {num_experts} experts")
        found = lookup(device_name, num_experts, n, k, tokens_per_expert, activations)
        if found is not None:
            return Selection(*found)
    config = heuristic_config(tokens_per_expert, activations)
    family = "" if activations == "bf16" else f" {activations}"
    return Selection(
        config,
        f"heuristic: smallest default{family} tile_m >= {tokens_per_expert} tokens per expert "
        f"(no tuning-table entry for E={num_experts}, N={n}, K={k}{family})",
    )
