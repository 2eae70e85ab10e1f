"""I/O paths: virtio (emulated kick, vhost-style kernel kick, polling; completions polled or by
interrupt), ivshmem between two VMs (polled, doorbell interrupt, or a wait in the VMM), SR-IOV
direct assignment, against the same ring between host threads and TCP over loopback.

Every path moves the same messages with two copies (see experiments/_iopaths.py), so the
differences are what each path adds: exits per message, wake-ups, and CPU time per byte.

Metrics of a case (one row each):
  gbit_per_s, msgs_per_s   streaming throughput, one sample per chunk of messages as they
                           arrive (higher is better)
  ns_per_msg               the same, as time per message
  rtt_ns                   echo round trips, one sample each (p50/p99 in the row)
  exits_per_msg            (VM paths) guest-caused exits per streamed message, KVM binary stats
  user_exits_per_msg       (VM paths) of them, exits to user space (the VMM) per streamed
                           message, the VMM's own count less its ucalls
  irqs_per_msg             (VM paths) interrupts the guests' handlers took per streamed message
                           (checked against the device's count and KVM's irq_injections)
  cpu_ns_per_msg_tx/_rx    CPU time per message of the producing / consuming thread: the vCPU
                           thread and the virtio backend (thread, or the in-exit handler in user
                           mode), or the two VMs' vCPU threads, or the two host threads
  ratio_to_native          (VM paths) throughput / io.native_ring's at the same size, measured
                           in the same worker right after
  ratio_to_tcp             (io.ivshmem) throughput / io.tcp_loopback's: the seeds' "10x" claim;
                           extra.solo_one_cpu has the ring code's cycles per message with both
                           ends on one CPU, in the guest and on the host (compute alone)
  model_ns_per_msg         (io.virtio, flags.model) exits/msg x the cost of one kick with the
                           device live + the guest's copy (+ the backend's copy in user mode,
                           where it runs on the vCPU thread); extra.model_terms also has the
                           kick as exits.pio_user / exits.pio_kernel measure it (nobody waiting
                           on the eventfd) and the model built from that
Every row's extra also has messages_total (the messages the case moved in all its measurements:
streamed, plus two per round trip) and, for the VM paths, irqs_per_msg / user_exits_per_msg
over those same measurements (stream and round trips together).

Modes: io.virtio `notify` is the driver -> device kick (user, kernel, poll) and `used` how
completions reach the driver (poll: it spins on the used ring; interrupt: an MSI through an
irqfd and a sleep in hlt). io.ivshmem `notify`: poll, doorbell (the producer's ioeventfd is an
irqfd of the consumer VM: QEMU's ivshmem-doorbell), vmm_wait (the same doorbell, the consumer
waits in its VMM: an exit to user space per wait, no interrupt controller).
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from vlab._errors import UsageError
from vlab.host.fingerprint import HALTPOLL_ADVICE, idle_halts_at_once
from vlab.run.registry import (LoopExperiment, Measurement, OneShotExperiment, Requirement,
                              needs_cap, needs_kvm, one_of, register, within)

from vlab.experiments import _iopaths
from vlab.experiments._iopaths import HostPath, Run, make_path

SIZES = [64, 256, 1024, 4096, 16384, 65536]
CHUNK_NS = 2_500_000          # target time of one throughput sample
SAMPLES_PER_LOOP = 4          # throughput samples per pyperf loop: one loop is ~10 ms
MAX_CHUNKS_PER_CALL = 16      # at most this many samples per measure call (~40 ms at the
                              # trial's pace); pyperf's time is scaled to the loops it asked
                              # for, so a calibration made while the host was fast cannot make
                              # a later, slower call run for seconds
RTT_BUDGET_NS = 3_000_000     # target time of the round trips of one measure call
MAX_RTT_ROUNDS = 256          # ... and at most this many (a starved round trip takes a
                              # scheduler time slice, ~3 ms)
WAIT_SHARE_WARN = 0.05        # run-queue wait above this share of a run makes a figure suspect
STARVED_FACTOR = 10           # a sample this many times slower than the case's fastest 5% ...
STARVED_SHARE = 0.05          # ... in more than this share of samples: a starved poller
STARVED_WAIT = 0.20           # or a never-blocking thread waited this share of a run for a CPU
THROUGHPUT = ("gbit_per_s", "msgs_per_s", "ratio_to_native", "ratio_to_tcp")

COMMON_METRICS = {"gbit_per_s": "Gbit/s", "msgs_per_s": "msg/s", "ns_per_msg": "ns",
                  "rtt_ns": "ns", "cpu_ns_per_msg_tx": "ns", "cpu_ns_per_msg_rx": "ns"}
VM_METRICS = {**COMMON_METRICS, "exits_per_msg": "exits", "user_exits_per_msg": "exits",
              "irqs_per_msg": "interrupts", "ratio_to_native": "ratio"}


# ---------------------------------------------------------------- validation

NOTIFY_MODES = {"io.virtio": ("user", "kernel", "poll"),
                "io.ivshmem": ("poll", "doorbell", "vmm_wait")}
USED_MODES = tuple(_iopaths.USED_MODES)         # io.virtio's `used`


def _int_param(params: dict, key: str, lo: int, hi: int, what: str) -> int:
    v = params.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise UsageError(f"{key} must be an integer from {what}, not {v!r}")
    return v


def validate_io(exp: str, params: dict) -> None:
    """Refuse impossible io.* parameters with a one-line UsageError (CLI exit 2)."""
    mb = _int_param(params, "msg_bytes", 64, 65536, "64 to 65536 (64 B .. 64 KiB)")
    if "batch" in params:
        _int_param(params, "batch", 1, 4096, "1 to 4096")
    if "notify" in params and params["notify"] not in NOTIFY_MODES.get(exp, ()):
        raise UsageError(f"notify must be one of {', '.join(NOTIFY_MODES.get(exp, ()))}, "
                         f"not {params['notify']!r}")
    if "qsize" in params:
        q = _int_param(params, "qsize", 2, 32768, "2 to 32768")
        if q & (q - 1):
            raise UsageError(f"qsize must be a power of two, not {q}")
        need = _iopaths.chain_len(mb, True)
        if need > q:
            raise UsageError(f"qsize {q} cannot hold a {mb}-byte echo chain ({need} descriptors "
                             f"of at most {_iopaths.SEG_BYTES} bytes); use qsize >= {need}")
    if "used" in params and params["used"] not in USED_MODES:
        raise UsageError(f"used must be one of {', '.join(USED_MODES)}, not {params['used']!r}")
    if "event_idx" in params and not isinstance(params["event_idx"], bool):
        raise UsageError(f"event_idx must be true or false, not {params['event_idx']!r}")


def _validator(exp: str):
    def validate(params: dict, host: dict) -> None:
        validate_io(exp, params)
    return validate


# ---------------------------------------------------------------- measurement

class State:
    """One worker's path, its baselines, and the sizes of a sample chosen by a trial run."""

    def __init__(self, exp: str, params: dict, host: dict):
        self.exp, self.params = exp, params
        self.batch = int(params.get("batch", 1))
        self.path = make_path(exp, params)
        self.closers = [self.path]
        self.chunk = self.rounds = 0
        self.native: HostPath | None = None
        self.tcp: HostPath | None = None
        self.model: dict[str, Any] = {}
        self.solo: dict[str, float] = {}
        try:
            self.chunk = _chunk_size(self.path, self.batch)
            self.rounds = _rounds(self.path)
            if exp in ("io.virtio", "io.ivshmem"):
                self.native = HostPath("io.native_ring", msg_bytes=params["msg_bytes"])
                self.native_chunk = _chunk_size(self.native, self.batch)
            if exp == "io.ivshmem":
                self.tcp = HostPath("io.tcp_loopback", msg_bytes=params["msg_bytes"])
                self.tcp_chunk = _chunk_size(self.tcp, 1)
                # the ring code alone, both ends on one CPU: guest vs host compute per message
                rounds = max(1, 200_000 // (self.path.capacity * params["msg_bytes"] // 64 + 1))
                self.solo = {
                    "guest_cycles_per_msg": self.path.solo(rounds=rounds, chunks=5,
                                                           batch=self.batch),
                    "host_cycles_per_msg": _iopaths.host_solo(params["msg_bytes"],
                                                              rounds=rounds, chunks=5,
                                                              batch=self.batch)}
            if exp == "io.virtio":
                self.model = _model_terms(self.path, params)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for c in self.closers:
            c.close()


def _chunk_size(path, batch: int) -> int:
    """Messages per throughput sample: about CHUNK_NS of traffic. Trial runs grow until they
    span a millisecond, so completions that arrive in bursts (a backend that drains a full ring
    at once) do not fool the estimate; at least 4 ring-fulls per sample for the same reason."""
    per_run = 64
    while True:
        trial = path.stream(chunk_msgs=per_run, chunks=4, warm=1, batch=batch)
        seconds = trial.seconds()
        if seconds >= 1e-3 or per_run >= 1 << 20:
            break
        per_run *= 8
    per_msg = max(seconds * 1e9 / (4 * per_run), 1.0)
    chunk = int(min(max(CHUNK_NS / per_msg, 16), 1 << 20))
    return max(chunk, 2 * batch, 4 * getattr(path, "capacity", 1))


def _rounds(path) -> int:
    trial = path.echo(rounds=16, warm=4)
    rtt = max(float(np.mean(trial.rtt_ns())), 1.0)
    return int(min(max(RTT_BUDGET_NS / rtt, 32), MAX_RTT_ROUNDS))


def _model_terms(path: _iopaths.VirtioPath, params: dict) -> dict:
    """The measured terms of the io.virtio model.

    kick_ns       one kick exit measured exactly as exits.pio_user / exits.pio_kernel measure
                  it (a sink / an eventfd nobody waits on): the issue's "exits.pio_kernel";
    kick_live_ns  the same kick on this VM with its device live (kernel: the backend thread
                  sleeps on the ioeventfd, so every kick also wakes it; user: the exit runs the
                  device on an empty queue);
    guest_copy_ns / backend_copy_ns  the producer's copy (in the guest, into the slot buffers)
                  and the backend's copy into its sink (host memcpy).
    """
    from vlab.experiments import _micro
    from vlab.experiments._micro import (PIO_KERNEL_PORT, PIO_USER_PORT, eventfd, eventfd_count,
                                         sink_hits, sink_pio)

    notify = params.get("notify", "kernel")
    terms: dict[str, Any] = {"kick_experiment": None, "kick_ns": 0.0, "kick_live_ns": 0.0}
    if notify in ("user", "kernel"):
        if notify == "user":
            case = _micro.MicroCase(op="out", cpl=3, iters=8, a0=PIO_USER_PORT, a1=0x5A,
                                    prepare=sink_pio(PIO_USER_PORT), counts=sink_hits)
        else:
            case = _micro.MicroCase(op="out", cpl=3, iters=8, a0=PIO_KERNEL_PORT, a1=0x5A,
                                    prepare=eventfd(PIO_KERNEL_PORT, 1, True),
                                    counts=eventfd_count)
        st = _micro.setup(case)
        try:
            meas = _micro.measure(st, 24)
        finally:
            _micro.teardown(st)
        cycles = float(np.median(meas.metrics["guest_cycles"]))
        terms["kick_experiment"] = f"exits.pio_{notify}"
        terms["kick_cycles"] = cycles
        terms["kick_ns"] = cycles / (st.tsc_khz * 1e-6)
        live = path.kicks(chunk_msgs=64, chunks=6, live=True)
        terms["kick_live_ns"] = float(np.median(live)) / (path.tsc_khz * 1e-6)
    mb = int(params["msg_bytes"])
    per = path.copy(chunk_msgs=64, chunks=8, warm=1)
    terms["guest_copy_ns"] = float(np.median(per)) / (path.tsc_khz * 1e-6)
    from vlab.vmm import devices as _io

    iters = max(64, min(20000, (8 << 20) // mb))
    terms["backend_copy_ns"] = _io.copy_ns(mb, path.capacity, iters, memcpy=True)
    terms["serial_backend"] = notify == "user"
    return terms


def _model_ns(terms: dict, exits_per_msg: float, kick: str = "kick_live_ns") -> float:
    """exits/msg x kick cost + the copies on the vCPU's path (the backend's copy too in user
    mode, where the device runs inside the exit; in parallel on its own thread otherwise)."""
    t = exits_per_msg * terms[kick] + terms["guest_copy_ns"]
    if terms["serial_backend"]:
        t += terms["backend_copy_ns"]
    return t


def _setup(exp: str):
    def setup(params: dict, host: dict) -> State:
        return State(exp, params, host)
    return setup


def _check_integrity(run: Run, what: str) -> None:
    if run.errors or run.received < run.total_msgs:
        raise RuntimeError(f"{what}: {run.received} of {run.total_msgs} messages arrived, "
                           f"{run.seq_errors} out of sequence, {run.len_errors} with a wrong "
                           f"length, {run.sum_errors} with a wrong checksum")
    if run.irqs is not None and run.irqs != run.irqs_sent:
        raise RuntimeError(f"{what}: the guests handled {run.irqs} interrupts, the device or "
                           f"the peer's doorbell sent {run.irqs_sent}")


def _kvm_injections(run: Run) -> int | None:
    k = run.extra.get("kvm_irq_injections")
    return None if k is None else int(sum(k) if isinstance(k, list) else k)


def _measure(st: State, loops: int) -> Measurement:
    asked = max(1, int(loops) * SAMPLES_PER_LOOP)
    chunks = min(asked, MAX_CHUNKS_PER_CALL)
    t_call = time.monotonic()
    # a generous bound (a loaded host stretches everything), still finite
    st.path.timeout = max(30.0, 50 * (chunks + 1) * CHUNK_NS * 1e-9 + 50 * RTT_BUDGET_NS * 1e-9)
    run = st.path.stream(chunk_msgs=st.chunk, chunks=chunks, warm=1, batch=st.batch)
    _check_integrity(run, f"{st.exp} stream")
    echo = st.path.echo(rounds=st.rounds, warm=8)
    _check_integrity(echo, f"{st.exp} echo")
    gbit = run.gbit_per_s()
    metrics: dict[str, list[float]] = {
        "gbit_per_s": gbit.tolist(),
        "msgs_per_s": run.msgs_per_s().tolist(),
        "ns_per_msg": run.ns_per_msg().tolist(),
        "rtt_ns": echo.rtt_ns().tolist(),
        "cpu_ns_per_msg_tx": [run.tx_cpu_ns / run.total_msgs],
        "cpu_ns_per_msg_rx": [run.rx_cpu_ns / run.total_msgs],
    }
    extra: dict[str, Any] = {"chunk_msgs": st.chunk, "chunks": chunks, "rtt_rounds": st.rounds,
                             "messages": run.total_msgs, "batch": st.batch,
                             "tx_thread": _thread_names(st.exp, st.params)[0],
                             "rx_thread": _thread_names(st.exp, st.params)[1],
                             "copies_per_msg": 2, "loadavg": _loadavg(),
                             "cpu_wait_share": run.wait_share(),
                             "rtt_cpu_wait_share": echo.wait_share(), **run.extra}
    moved = run.total_msgs + 2 * echo.total_msgs       # a round trip is two messages
    extra["messages_moved"] = moved
    if run.exits is not None:
        metrics["exits_per_msg"] = [run.exits_per_msg()]
        extra["exits"] = run.exits
    if run.irqs is not None:
        metrics["irqs_per_msg"] = [run.irqs_per_msg()]
        metrics["user_exits_per_msg"] = [run.user_exits_per_msg()]
        extra["irqs"] = run.irqs + (echo.irqs or 0)
        extra["user_exits"] = run.user_exits + (echo.user_exits or 0)
        extra["kvm_irq_injections"] = [_kvm_injections(run), _kvm_injections(echo)]
        extra["irqs_sent"] = [run.irqs_sent, echo.irqs_sent]
        extra["rtt_irqs_per_round_trip"] = echo.irqs / echo.total_msgs
        extra["rtt_user_exits_per_round_trip"] = echo.user_exits / echo.total_msgs
    if st.native is not None:
        nat = st.native.stream(chunk_msgs=st.native_chunk, chunks=3, warm=1, batch=st.batch)
        _check_integrity(nat, "io.native_ring baseline")
        nat_gbit = float(np.median(nat.gbit_per_s()))
        metrics["ratio_to_native"] = (gbit / nat_gbit).tolist()
        extra["native_gbit_per_s"] = nat_gbit
    if st.tcp is not None:
        tcp = st.tcp.stream(chunk_msgs=st.tcp_chunk, chunks=3, warm=1)
        _check_integrity(tcp, "io.tcp_loopback baseline")
        tcp_gbit = float(np.median(tcp.gbit_per_s()))
        metrics["ratio_to_tcp"] = (gbit / tcp_gbit).tolist()
        extra["tcp_gbit_per_s"] = tcp_gbit
    if st.solo:
        extra["solo_one_cpu"] = st.solo
    if st.model:
        e = run.exits_per_msg() or 0.0
        metrics["model_ns_per_msg"] = [_model_ns(st.model, e)]
        extra["model"] = dict(st.model, exits_per_msg=e,
                              exits_pio_plus_copy_ns=_model_ns(st.model, e, "kick_ns"),
                              one_exit_pio_plus_copy_ns=_model_ns(st.model, 1.0, "kick_ns"))
    # total time / messages: what the model (built from run totals of exits) predicts; the
    # median chunk can hide a bimodal run (kernel mode streams without kicks, or kicks each one)
    extra["ns_per_msg_mean"] = float(np.mean(metrics["ns_per_msg"]))
    extra["call_wall_s"] = round(time.monotonic() - t_call, 4)
    return Measurement(run.seconds() * asked / chunks, metrics, extra)


def _thread_names(exp: str, params: dict) -> tuple[str, str]:
    if exp == "io.virtio":
        if params.get("notify") == "user":
            return ("vCPU thread (less the backend's time in the exit)",
                    "backend in the PIO exit handler on the vCPU thread")
        return ("vCPU thread", f"backend thread ({params.get('notify')})")
    if exp == "io.ivshmem":
        return ("producer VM's vCPU thread", "consumer VM's vCPU thread")
    return ("producer thread", "consumer thread")


def _loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _teardown(st: State) -> None:
    st.close()


def annotate(params: dict, host: dict, metric: str, samples: list, extras: list):
    """Flags and warnings: the model row is a model; exits are checked against the kicks the
    guest issued and the device received; the virtio model is compared with the measurement."""
    warnings: list[str] = []
    flags: dict = {}
    extra: dict = _totals(extras)
    last = extras[-1] if extras else {}
    if metric == "model_ns_per_msg":
        flags["model"] = True
        model = float(np.mean(samples))
        extra["model_terms"] = last.get("model", {})
        per = [e["ns_per_msg_mean"] for e in extras if "ns_per_msg_mean" in e]
        if per and model:
            meas = float(np.mean(per))
            extra["measured_ns_per_msg"] = meas
            extra["measured_over_model"] = meas / model
            pio = [e["model"]["exits_pio_plus_copy_ns"] for e in extras if "model" in e]
            if pio and np.mean(pio):
                extra["measured_over_exits_pio_plus_copy"] = meas / float(np.mean(pio))
            if abs(meas / model - 1) > 0.25:
                warnings.append(f"measured {meas:,.0f} ns/msg is {meas / model:.2f}x the model "
                                f"({model:,.0f} ns/msg)")
        if params.get("notify") == "kernel" and idle_halts_at_once(host):
            # the kick wakes a backend thread on a CPU that halted at once: an IPI through the
            # outer hypervisor per wake-up, which exits.pio_kernel (nobody waiting) never pays
            extra["host_idle"] = "cpuidle-haltpoll, guest_halt_poll_ns=0"
            warnings.append("this host's idle CPUs halt at once (cpuidle-haltpoll polls 0 ns): "
                            "each kick that wakes the backend also pays a cross-CPU IPI; "
                            f"`{HALTPOLL_ADVICE}` removes it")
    if metric == "irqs_per_msg":
        warnings += _irq_warnings(extras)
    if metric == "exits_per_msg":
        got = float(np.mean(samples))
        kicks = [e["guest_kicks"] / e["messages"] for e in extras if "guest_kicks" in e]
        dev = [e["device_kicks"] / e["messages"] for e in extras if "device_kicks" in e]
        if kicks:
            extra["guest_kicks_per_msg"] = float(np.mean(kicks))
            extra["device_kicks_per_msg"] = float(np.mean(dev)) if dev else None
            if abs(np.mean(kicks) - np.mean(dev)) > 1e-9:
                warnings.append(f"the guest kicked {np.mean(kicks):.4f} times per message but the "
                                f"device saw {np.mean(dev):.4f}")
            if abs(got - np.mean(kicks)) > 0.02 * max(1.0, got):
                warnings.append(f"KVM counted {got:.3f} exits per message, the guest kicked "
                                f"{np.mean(kicks):.3f} times per message")
        rings = [(e["kicks"] + e["waits"]) / e["messages"] for e in extras
                 if "waits" in e and "kicks" in e and "guest_kicks" not in e]
        if rings and abs(got - np.mean(rings)) > 0.02 * max(1.0, got) + 0.01:
            warnings.append(f"KVM counted {got:.3f} exits per message, the guests rang and "
                            f"waited {np.mean(rings):.3f} times per message")
        if params.get("notify") == "poll" and got > 0.01:
            warnings.append(f"{got:.3f} exits per message in poll mode (expected none)")
    # run-queue wait of the threads that never block (None for paths whose threads all sleep)
    key = {"rtt_ns": "rtt_cpu_wait_share"}.get(metric, "cpu_wait_share")
    shares = [e[key] for e in extras if e.get(key) is not None]
    if metric in ("gbit_per_s", "msgs_per_s", "ns_per_msg", "rtt_ns", "ratio_to_native",
                  "ratio_to_tcp") and shares:
        worst = max(shares)
        extra["cpu_wait_share_max"] = worst
        starved = starvation(metric, samples, worst)
        extra["starvation"] = starved
        if starved["starved"]:
            flags["starved"] = True
            warnings.append(
                f"starved: {100 * starved['slow_share']:.0f}% of the samples took over "
                f"{STARVED_FACTOR}x the fastest 5% and a never-blocking thread waited up to "
                f"{100 * worst:.0f}% of a run for a CPU: a spinning thread lost its CPU to "
                f"another runnable thread ({os.cpu_count()} CPUs here; the other poller when "
                "both share one, or other load); pin them apart (--pin auto) on an idle host")
        elif worst > WAIT_SHARE_WARN:
            warnings.append(f"the measuring threads spent up to {100 * worst:.0f}% of a run "
                            "waiting for a CPU (other load on the host): spinning paths lose "
                            "their core and slow down by orders of magnitude")
    return warnings, flags, extra


def _totals(extras: list) -> dict:
    """What every io row reports about the whole case: messages_total (every message its
    measurements moved, in all worker processes) and, for VM paths, interrupts and exits to
    user space per message over the same messages."""
    moved = sum(e.get("messages_moved", 0) for e in extras)
    out: dict[str, Any] = {"messages_total": moved}
    if moved and any("irqs" in e for e in extras):
        irqs = sum(e.get("irqs", 0) for e in extras)
        out["irqs_per_msg_all"] = irqs / moved
        out["user_exits_per_msg_all"] = sum(e.get("user_exits", 0) for e in extras) / moved
        kvm = [k for e in extras for k in e.get("kvm_irq_injections", []) if k is not None]
        if kvm:
            out["kvm_reinjections"] = sum(kvm) - irqs
    return out


def _irq_warnings(extras: list) -> list[str]:
    """The guests' interrupt count against KVM's irq_injections, where KVM counts them (the
    guest's own count is checked against the sender's in every measurement). KVM counts an
    injection again when an exit interrupted its delivery and it re-injects it, so its count
    may exceed the guests' (irqs_per_msg's extra has kvm_reinjections); below it, an interrupt
    the guest handled was never injected, which cannot be."""
    handled = sum(e.get("irqs", 0) for e in extras)
    kvm = [k for e in extras for k in e.get("kvm_irq_injections", []) if k is not None]
    if kvm and sum(kvm) < handled:
        return [f"the guests handled {handled} interrupts, KVM counted {sum(kvm)} injections"]
    return []


def _cap_for(cap: str, key: str, value: str) -> Requirement:
    """KVM capability `cap`, only for the cases whose `key` is `value`."""
    req = needs_cap(cap, f"{key}={value}")

    def check(host: dict, params: dict) -> str | None:
        return req.check(host, params) if params.get(key) == value else None
    return Requirement(f"{cap.lower()}:{key}={value}", check)


def starvation(metric: str, samples: list, wait_share: float) -> dict:
    """Whether a spinning path was starved of CPU time: more than STARVED_SHARE of its samples
    over STARVED_FACTOR times slower than its fastest 5% (a poller that lost its CPU makes
    its peer wait a whole scheduler time slice: hundreds of times the normal pace), or a
    never-blocking thread that waited over STARVED_WAIT of a run for a CPU."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[np.isfinite(x) & (x > 0)]
    if metric in THROUGHPUT:
        x = 1.0 / x                     # as time per unit: larger is slower
    slow = float(np.mean(x > STARVED_FACTOR * np.percentile(x, 5))) if len(x) else 0.0
    return {"slow_share": slow, "factor": STARVED_FACTOR, "wait_share_max": wait_share,
            "starved": bool(slow > STARVED_SHARE or wait_share > STARVED_WAIT)}


def _ioeventfd_for(notify: str) -> Requirement:
    """KVM_CAP_IOEVENTFD, for the notify mode that kicks through an ioeventfd."""
    cap = needs_cap("IOEVENTFD", f"notify={notify}")

    def check(host: dict, params: dict) -> str | None:
        return cap.check(host, params) if params.get("notify") == notify else None
    return Requirement(f"ioeventfd:{notify}", check)


# ---------------------------------------------------------------- declarations

# what each value may be (vlab.run.registry.Limit), the ranges validate_io enforces
LIMITS = {"msg_bytes": within(64, 65536, "message bytes, at most 64 KiB"),
          "batch": within(1, 4096, "messages per kick"),
          "qsize": within(2, 32768, "virtqueue size, a 16-bit field (at most 32768)"),
          "bar": within(-1, 5, "BAR index, -1 for the first mappable"),
          "write_offset": within(-1, 1 << 40, "byte offset in the BAR, -1 for none"),
          "write_value": within(0, (1 << 32) - 1, "the value of a 32-bit register write"),
          "event_idx": one_of(False, True)}

register(LoopExperiment(
    name="io.virtio",
    description="split virtqueue (virtio 1.x) TX and echo: kick by PIO exit (user), ioeventfd + "
                "backend thread (kernel), or a polling backend (poll); completions polled "
                "(used=poll) or an MSI through an irqfd while the driver sleeps in hlt "
                "(used=interrupt)",
    params={"notify": ["user", "kernel", "poll"], "used": list(USED_MODES), "msg_bytes": SIZES,
            "batch": [1, 16], "event_idx": [False, True], "qsize": [256]},
    quick={"notify": ["user", "kernel", "poll"], "used": list(USED_MODES), "msg_bytes": [64],
           "batch": [1], "event_idx": [False], "qsize": [256]},
    metrics={**VM_METRICS, "model_ns_per_msg": "ns"},
    requires=[needs_kvm(), _ioeventfd_for("kernel"), _cap_for("IRQCHIP", "used", "interrupt"),
              _cap_for("IRQFD", "used", "interrupt")],
    handled_by="device backend in the VMM", payload="virtio", higher_is_better=THROUGHPUT,
    validate=_validator("io.virtio"), annotate=annotate, limits=LIMITS,
    setup=_setup("io.virtio"), measure=_measure, teardown=_teardown))

register(LoopExperiment(
    name="io.ivshmem",
    description="two VMs, an SPSC ring in a shared memfd slot; polled (ivshmem-plain), a "
                "doorbell interrupt (ivshmem-doorbell: the producer's ioeventfd is an irqfd of "
                "the consumer, which sleeps in hlt), or the doorbell waited for in the VMM "
                "(vmm_wait: an exit to user space per wait)",
    params={"notify": list(NOTIFY_MODES["io.ivshmem"]), "msg_bytes": SIZES, "batch": [1, 16]},
    quick={"notify": list(NOTIFY_MODES["io.ivshmem"]), "msg_bytes": [64], "batch": [1]},
    metrics={**VM_METRICS, "ratio_to_tcp": "ratio"},
    requires=[needs_kvm(), _ioeventfd_for("doorbell"), _ioeventfd_for("vmm_wait"),
              _cap_for("IRQCHIP", "notify", "doorbell"), _cap_for("IRQFD", "notify", "doorbell")],
    handled_by="guest to guest (shared memory)", payload="ivshmem",
    higher_is_better=THROUGHPUT, validate=_validator("io.ivshmem"), annotate=annotate,
    limits=LIMITS,
    setup=_setup("io.ivshmem"), measure=_measure, teardown=_teardown))

register(LoopExperiment(
    name="io.native_ring",
    description="the same SPSC ring code between two host threads: the physical limit here",
    params={"msg_bytes": SIZES, "batch": [1, 16]},
    quick={"msg_bytes": [64], "batch": [1]},
    metrics=dict(COMMON_METRICS), handled_by="host threads", payload=None,
    higher_is_better=THROUGHPUT, validate=_validator("io.native_ring"), annotate=annotate,
    limits=LIMITS,
    setup=_setup("io.native_ring"), measure=_measure, teardown=_teardown))

register(LoopExperiment(
    name="io.tcp_loopback",
    description="TCP over 127.0.0.1 between two host threads (TCP_NODELAY, one send per message)",
    params={"msg_bytes": SIZES}, quick={"msg_bytes": [64]},
    metrics=dict(COMMON_METRICS), handled_by="host kernel TCP/IP", payload=None,
    higher_is_better=THROUGHPUT, validate=_validator("io.tcp_loopback"), annotate=annotate,
    limits=LIMITS,
    setup=_setup("io.tcp_loopback"), measure=_measure, teardown=_teardown))


# ---------------------------------------------------------------- io.sriov

SRIOV_METRICS = {"mmio_read_cycles": "cycles", "mmio_write_cycles": "cycles",
                 "exits_per_access": "exits", "dma_map_ns_per_page": "ns",
                 "dma_unmap_ns_per_page": "ns"}
SRIOV_BAR_GPA = 0x200000000          # 8 GiB: clear of the data slots below
SRIOV_DMA_PAGES = 4096


def sriov_reason(host: dict) -> str | None:
    """Why io.sriov cannot run on `host` (a fingerprint), or None when a VF on vfio-pci is there."""
    dev = host.get("devices") or {}
    if dev.get("sriov_usable_vf"):
        return None
    return dev.get("sriov_reason") or "no SR-IOV VF bound to vfio-pci"


def sriov_target(host: dict) -> dict:
    """The VF io.sriov opens: {bdf, group_dev, iommu_group, pf}. Needs sriov_reason(host) None."""
    vf = (host.get("devices") or {}).get("sriov_usable_vf")
    if not vf:
        raise UsageError(f"io.sriov: {sriov_reason(host)}")
    return {k: vf[k] for k in ("bdf", "group_dev", "iommu_group", "pf")}


def _sriov_validate(params: dict, host: dict) -> None:
    _int_param(params, "bar", -1, 5, "-1 (first mappable) to 5")
    _int_param(params, "write_offset", -1, 1 << 40, "-1 (no writes) up")
    if "write_value" in params:
        _int_param(params, "write_value", 0, (1 << 32) - 1, "0 to 0xffffffff (a 32-bit write)")


def _sriov_requirement() -> Requirement:
    return Requirement("sriov", lambda host, params: sriov_reason(host))


def _pick_bar(vfio, want: int) -> tuple[int, int]:
    """(index, size) of BAR `want`, or of the first BAR that can be mmapped (want < 0)."""
    from vlab.vmm.devices import VFIO_REGION_MMAP

    for index in ([want] if want >= 0 else range(6)):
        try:
            size, _off, flags = vfio.region(index)
        except Exception:  # noqa: BLE001 - a BAR the device does not have
            continue
        if size and size % 4096 == 0 and flags & VFIO_REGION_MMAP:
            return index, size
    raise RuntimeError("the VF has no BAR that VFIO lets us mmap (whole pages)")


def _sriov_run(params: dict, host: dict, progress) -> list[dict]:
    """Map a VF BAR into a guest and time guest MMIO to it (expect no exits), and time
    VFIO_IOMMU_MAP_DMA / UNMAP_DMA of guest memory page by page."""
    from vlab import results
    from vlab.vmm.devices import Vfio
    from vlab.vmm.machine import Machine

    from vlab.experiments import _micro

    target = sriov_target(host)
    rows: list[dict] = []
    write_off = int(params.get("write_offset", -1))
    with Vfio(target["group_dev"], target["bdf"]) as vfio:
        bar, size = _pick_bar(vfio, int(params.get("bar", -1)))
        common = {"vf": target["bdf"], "bar": bar, "bar_bytes": size, "gpa": SRIOV_BAR_GPA}

        def prepare(m: Machine) -> dict:
            vfio.map_bar(m.vm, bar, SRIOV_BAR_GPA)
            m.vm.map(m.cr3, SRIOV_BAR_GPA, SRIOV_BAR_GPA, size, 4096)
            return {}

        for metric, op, a1, wanted in (("mmio_read_cycles", "mmio_read", 0, True),
                                       ("mmio_write_cycles", "mmio_write",
                                        int(params.get("write_value", 0)), write_off >= 0)):
            if not wanted:
                rows.append(results.skip_row(
                    "io.sriov", params, metric, "cycles",
                    "writes to a real device's registers can have side effects: give a "
                    "harmless register with -p write_offset=OFF [-p write_value=V]"))
                continue
            off = 0 if op == "mmio_read" else write_off
            case = _micro.MicroCase(op=op, cpl=3, iters=64, a0=SRIOV_BAR_GPA + off, a1=a1,
                                    prepare=prepare)
            st = _micro.setup(case)
            try:
                meas = _micro.measure(st, 64)
            finally:
                _micro.teardown(st)
            rows.append(results.make_row("io.sriov", params, metric, "cycles",
                                         meas.metrics["guest_cycles"],
                                         extra=dict(common, **meas.extra)))
            if op == "mmio_read":
                rows.append(results.make_row("io.sriov", params, "exits_per_access", "exits",
                                             meas.metrics["exits_per_op"], extra=common))
        with Machine() as m:
            slot = m.add_data(SRIOV_DMA_PAGES * 4096, prefault=True)
            maps, unmaps = [], []
            for _ in range(5):
                t_map, t_unmap = vfio.dma_map_cost(slot, slot.gpa, SRIOV_DMA_PAGES)
                maps.append(t_map / SRIOV_DMA_PAGES)
                unmaps.append(t_unmap / SRIOV_DMA_PAGES)
        extra = dict(common, pages=SRIOV_DMA_PAGES, granularity="one page per ioctl")
        rows.append(results.make_row("io.sriov", params, "dma_map_ns_per_page", "ns", maps,
                                     extra=extra))
        rows.append(results.make_row("io.sriov", params, "dma_unmap_ns_per_page", "ns", unmaps,
                                     extra=extra))
    return rows


register(OneShotExperiment(
    name="io.sriov",
    description="SR-IOV VF through VFIO: a BAR mapped into the guest (MMIO without exits) and "
                "VFIO_IOMMU_MAP_DMA cost per page",
    # write_value only matters with write_offset >= 0; it is a grid axis so that `-p write_value=V`
    # (which the skip reason advertises) is accepted
    params={"bar": [-1], "write_offset": [-1], "write_value": [0]},
    quick={"bar": [-1], "write_offset": [-1], "write_value": [0]},
    metrics=SRIOV_METRICS, requires=[needs_kvm(), _sriov_requirement()],
    validate=_sriov_validate, limits=LIMITS,
    handled_by="device (direct assignment)", payload="micro", run=_sriov_run))
