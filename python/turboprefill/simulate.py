"""An event-driven model of the pipeline: what a prefill would take on devices nobody here has.

Each (stage, ubatch) step costs what costmodel.DeviceCost says; each hand-off between stages costs the
link's latency plus the activation's bytes over its bandwidth. The model replays the engine's rules
(scheduler.cpp): a stage starts ubatch m when it has finished ubatch m-1 and the activations of m have
arrived; a producer waits for one of the R ring slots, which the consumer frees as it takes the slot's
data; the sequential schedule adds the credit from the last stage back to stage 0. "lockstep" models the
proof of concept: all stages advance in waves, each wave ends when its slowest step ends, then every
activation goes GPU -> host -> GPU with a host wait, and the one host thread pays `wave_overhead` per layer
of each busy GPU before the next wave (building, launching and synchronizing each GPU's graph, whose size
is its layer count). The result is a Trace,
so Trace.plot draws it like a measured one.

Device profiles (PROFILES) turn published peak numbers into DeviceCosts with efficiencies that are
ASSUMPTIONS (one scalar fitted to one published measurement, see bench/README.md), not measurements; so is
the lockstep host cost, fitted to the PoC's published run (fit_wave_overhead).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .costmodel import DeviceCost, plan_ubatches
from .engine import Trace, TraceEvent

# Effective one-direction bandwidth (GB/s, ~80% of the link's raw rate) and per-copy latency (s).
LINKS = {
    "pcie3": (12.0, 10e-6),
    "pcie4": (24.0, 10e-6),
    "pcie5": (48.0, 10e-6),
    "pcie5x8": (24.0, 10e-6),  # RTX 5060 Ti: a PCIe 5.0 x8 card
    "pcie1x4": (0.8, 10e-6),  # P104-100: the mining card's PCIe 1.1 x4
    "nvlink3090": (45.0, 5e-6),  # RTX 3090 NVLink bridge: 56 GB/s per direction raw
    "nvlink-a100": (240.0, 5e-6),
    "nvlink-h100": (360.0, 5e-6),
    "memcpy": (8.0, 0.0),  # cpu stages: the producer's memcpy into the next stage's slot
    "none": (float("inf"), 0.0),  # free hand-offs (tests of the schedule rules)
}


def link_seconds(link: str, n_bytes: float, host_staging: bool = False) -> float:
    """One copy; host staging (no peer access) is two PCIe hops, device -> pinned host -> device."""
    bw, lat = LINKS[link]
    one = lat + n_bytes / (bw * 1e9)
    return 2 * one if host_staging else one


@dataclass
class ModelSpec:
    """What the cost of a prefill depends on."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    windows: list[int] = field(default_factory=list)  # per layer; 0 = full attention
    bits_per_weight: float = 4.85  # Q4_K_M's average
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0

    def __post_init__(self):
        if not self.windows:
            self.windows = [0] * self.n_layer

    def layer_macs_per_token(self) -> float:
        attn = self.n_embd * (2 * self.n_head * self.head_dim + 2 * self.n_head_kv * self.head_dim)
        ffn = (3 * self.n_embd * self.n_ff_exp * self.n_expert_used + self.n_embd * self.n_expert
               if self.n_expert else 3 * self.n_embd * self.n_ff)
        return float(attn + ffn)

    def layer_weight_bytes(self) -> float:
        attn = self.n_embd * (2 * self.n_head * self.head_dim + 2 * self.n_head_kv * self.head_dim)
        ffn = 3 * self.n_embd * (self.n_ff_exp * self.n_expert if self.n_expert else self.n_ff)
        return (attn + ffn) * self.bits_per_weight / 8


MODELS = {
    "llama3-70b-q4km": ModelSpec("Llama-3-70B Q4_K_M", 80, 8192, 64, 8, 128, 28672, 128256),
    # gpt-oss-120b: 128 experts of 2880 (MXFP4, 4.25 bits), 4 used; sliding window 128 on even layers.
    "gpt-oss-120b": ModelSpec("GPT-OSS-120B MXFP4", 36, 2880, 64, 8, 64, 2880, 201088,
                              windows=[128 if i % 2 == 0 else 0 for i in range(36)], bits_per_weight=4.25,
                              n_expert=128, n_expert_used=4, n_ff_exp=2880),
}


@dataclass
class DeviceProfile:
    """Published peaks (dense, no sparsity). int8: TOPS of the tensor cores (dp4a for cards without);
    fp16: TFLOPS with fp32 accumulation (what the attention tiles use); bw: GB/s of device memory."""

    name: str
    int8_tops: float
    fp16_tflops: float
    bw_gbs: float
    link: str

    def cost(self, m: ModelSpec, eff: float, bw_eff: float = 0.7, step_s: float = 30e-6) -> DeviceCost:
        """DeviceCost of one layer of m, assuming the matmuls reach `eff` of the int8 peak and the attention
        `eff` of the fp16 peak (both assumptions), and each ubatch streams every layer weight once at
        bw_eff of the memory bandwidth (all experts: a 512-token ubatch touches every expert)."""
        tok = 2 * m.layer_macs_per_token() / (eff * self.int8_tops * 1e12)
        pair = 4 * m.n_head * m.head_dim / (eff * self.fp16_tflops * 1e12)
        wread = m.layer_weight_bytes() / (bw_eff * self.bw_gbs * 1e9)
        head = (2 * m.n_vocab * m.n_embd) / (eff * self.int8_tops * 1e12) + m.n_vocab * m.n_embd * 0.8 / (
            bw_eff * self.bw_gbs * 1e9)
        return DeviceCost(tok=tok, pair=pair, head=head, step=step_s, wread=wread)


PROFILES = {
    "rtx3090": DeviceProfile("RTX 3090", 284.0, 71.0, 936.0, "pcie4"),
    "rtx5060ti": DeviceProfile("RTX 5060 Ti 16GB", 190.0, 47.0, 448.0, "pcie5x8"),
    "p104-100": DeviceProfile("P104-100", 26.8, 0.1, 320.0, "pcie1x4"),  # no tensor cores: dp4a int8
    "a100": DeviceProfile("A100 80GB SXM", 624.0, 312.0, 2039.0, "pcie4"),
    "h100": DeviceProfile("H100 SXM", 1979.0, 989.0, 3350.0, "pcie5"),
}


def simulate(costs: list[DeviceCost], split: list[int], windows: list[int], bounds: list[int], n_embd: int,
             schedule: str = "pipelined", link: str = "memcpy", host_staging: bool = False, ring_slots: int = 2,
             pos0: int = 0, handoff: float = 0.0, draws: int = 1, seed: int = 0,
             wave_overhead: float = 0.0) -> tuple[float, Trace]:
    """Predicted (seconds, Trace) of one prefill. costs[s]: stage s's device; split: layers per stage;
    bounds: ubatch boundaries (costmodel.plan_ubatches or range(0, n, U) + [n]); handoff: extra seconds per
    stage-to-stage hand-off (costmodel.fit_handoff: the consumer's wake-up, measured on cpu stages);
    wave_overhead: lockstep only, host seconds per layer of each busy stage per wave (fit_wave_overhead).
    draws > 1 with costs that carry a jitter: each step's time is drawn around its cost (log-normal, mean
    kept) and the totals of `draws` replays are averaged, because with jittering steps the stages wait on
    each other and a pipeline takes longer than its mean step times say; the Trace is the last replay."""
    if draws > 1 and any(c.jitter > 0 for c in costs):
        rng = np.random.default_rng(seed)
        runs = [_simulate(costs, split, windows, bounds, n_embd, schedule, link, host_staging, ring_slots, pos0,
                          handoff, rng, wave_overhead) for _ in range(draws)]
        return float(np.mean([t for t, _ in runs])), runs[-1][1]
    return _simulate(costs, split, windows, bounds, n_embd, schedule, link, host_staging, ring_slots, pos0,
                     handoff, None, wave_overhead)


def _simulate(costs, split, windows, bounds, n_embd, schedule, link, host_staging, ring_slots, pos0, handoff,
              rng, wave_overhead=0.0) -> tuple[float, Trace]:
    P, M = len(split), len(bounds) - 1
    if len(costs) != P or sum(split) != len(windows):
        raise ValueError(f"{len(costs)} device costs and split {split} for {len(windows)} layers")
    starts, b = [], 0
    for k in split:
        starts.append((b, b + k))
        b += k
    start = [[0.0] * M for _ in range(P)]
    end = [[0.0] * M for _ in range(P)]
    ready = [[0.0] * M for _ in range(P)]  # activation of ubatch m is in stage s's slot
    free = [[0.0] * M for _ in range(P)]  # stage s may start its next step (its send is done)
    events = []
    wave_end = 0.0
    for m in range(M):
        p, t = pos0 + bounds[m], bounds[m + 1] - bounds[m]
        for s in range(P):
            lo, hi = starts[s]
            c = costs[s].step_time(p, t, windows[lo:hi], s == 0, s == P - 1 and m == M - 1)
            if rng is not None and costs[s].jitter > 0:
                j = costs[s].jitter
                c *= float(np.exp(rng.normal(0.0, j) - j * j / 2))
            if schedule == "lockstep":
                continue
            prev = free[s][m - 1] if m else 0.0
            st = max(prev, ready[s][m])
            if schedule == "sequential" and s == 0 and m:
                st = max(st, end[P - 1][m - 1])
            start[s][m], end[s][m] = st, st + c
            if s < P - 1:
                slot = start[s + 1][m - ring_slots] if m >= ring_slots else 0.0
                send = max(end[s][m], slot)
                copied = send + link_seconds(link, t * n_embd * 4, host_staging)
                free[s][m] = copied  # the producer is done once its copy is; the consumer wakes up later
                ready[s + 1][m] = copied + handoff
            else:
                free[s][m] = end[s][m]
            events.append(TraceEvent(s, m, t, start[s][m], end[s][m]))
    if schedule == "lockstep":
        # Wave w runs stage s on ubatch w - s; the host waits for the wave, then stages activations through
        # host memory (two hops) one after another from its single thread, then prepares each busy GPU's
        # next step (wave_overhead per layer, serial on that thread: the GPUs idle meanwhile).
        for w in range(M + P - 1):
            steps = []
            for s in range(P):
                m = w - s
                if 0 <= m < M:
                    lo, hi = starts[s]
                    p, t = pos0 + bounds[m], bounds[m + 1] - bounds[m]
                    c = costs[s].step_time(p, t, windows[lo:hi], s == 0, s == P - 1 and m == M - 1)
                    events.append(TraceEvent(s, m, t, wave_end, wave_end + c))
                    steps.append((s, t, c))
            wave_end += max(c for _, _, c in steps)
            wave_end += sum(link_seconds(link, t * n_embd * 4, True) for s, t, _ in steps if s < P - 1)
            wave_end += wave_overhead * sum(split[s] for s, _, _ in steps)
        return wave_end, Trace(sorted(events, key=lambda e: (e.ubatch, e.stage)))
    total = max(end[P - 1][M - 1], max(e.end for e in events)) if M else 0.0
    return total, Trace(sorted(events, key=lambda e: (e.ubatch, e.stage)))


def fixed_bounds(n: int, u: int) -> list[int]:
    return list(range(0, n, u)) + [n]


def auto_bounds(cost: DeviceCost, windows: list[int], n: int, umin: int, umax: int, pos0: int = 0,
                n_stages: int = 1) -> list[int]:
    """The engine's equal-cost cut for these coefficients (same planner, through the C ABI). A step's
    fixed cost per layer: the weight streaming plus the stage's per-step cost spread over its layers."""
    n_swa = max(windows) if any(windows) else 0
    step = cost.wread + cost.step * n_stages / len(windows)
    return plan_ubatches([1 if w else 0 for w in windows], n_swa, cost.tok, max(cost.pair, 1e-30), n, pos0, umin,
                         umax, step, n_stages)


def ideal_seconds(costs: list[DeviceCost], split: list[int], windows: list[int], bounds: list[int]) -> float:
    """Busy time of the whole prefill divided by the stage count: perfect overlap, no bubbles."""
    busy = 0.0
    P = len(split)
    lo = 0
    for s, k in enumerate(split):
        for m in range(len(bounds) - 1):
            p, t = bounds[m], bounds[m + 1] - bounds[m]
            busy += costs[s].step_time(p, t, windows[lo:lo + k], s == 0, s == P - 1 and m == len(bounds) - 2)
        lo += k
    return busy / P


def fit_efficiency(profile: DeviceProfile, model: ModelSpec, P: int, n: int, tok_s: float, schedule: str,
                   ubatch: int = 512) -> float:
    """The one assumed number of a profile, chosen so that the simulator reproduces one published measurement
    (tok_s for n tokens on P devices of this profile, even split, fixed ubatch): bisection on eff."""
    lo, hi = 1e-3, 1.0
    for _ in range(60):
        eff = (lo * hi) ** 0.5
        c = profile.cost(model, eff)
        t, _ = simulate([c] * P, even(model.n_layer, P), model.windows, fixed_bounds(n, ubatch), model.n_embd,
                        schedule, profile.link)
        lo, hi = (eff, hi) if n / t < tok_s else (lo, eff)
    return (lo * hi) ** 0.5


def fit_wave_overhead(profile: DeviceProfile, model: ModelSpec, P: int, n: int, tok_s: float, eff: float,
                      ubatch: int = 512) -> float:
    """The lockstep model's host seconds per layer per wave that make it reproduce a measured lockstep run
    (tok_s for n tokens on P devices, even split, fixed ubatch), the profile's efficiency already fitted to
    another measurement (fit_efficiency). The time is linear in it: every ubatch passes every layer once,
    so it is the missing time over M·n_layer. Negative when the model without it is already slower."""
    c = [profile.cost(model, eff)] * P
    bounds = fixed_bounds(n, ubatch)
    t0, _ = simulate(c, even(model.n_layer, P), model.windows, bounds, model.n_embd, "lockstep", profile.link)
    return (n / tok_s - t0) / ((len(bounds) - 1) * model.n_layer)


def even(n_layer: int, P: int) -> list[int]:
    return [n_layer // P + (1 if s < n_layer % P else 0) for s in range(P)]
