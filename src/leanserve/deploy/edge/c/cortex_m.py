"""The generated C on a Cortex-M4: cross-compiled with Debian's ``gcc-arm-none-eabi`` (``-mcpu=cortex-m4
-mthumb -Os``), sized with ``arm-none-eabi-size``, and run on QEMU's ``mps2-an386`` board (a Cortex-M4)
with semihosting for its output.

Two firmware images are linked. The *minimal* one is what a device would flash: startup code, the model
and a call to ``leanserve_predict``; its sections give flash (text + rodata + the data initializers) and
RAM (data + bss, which holds the scratch arena, plus the deepest stack the compiler reports). The *test*
one adds a few rows as constants, runs them, prints every output float as its bit pattern over
semihosting, and counts instructions: under ``-icount shift=0`` QEMU advances its virtual clock one
nanosecond per instruction, and SysTick (clocked from the board's 25 MHz system clock) is read around
each inference; a loop of known length calibrates ticks to instructions.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanserve.deploy.edge.c.verify import CompileError

CPU_FLAGS = ("-mcpu=cortex-m4", "-mthumb", "-Os")
CFLAGS = (*CPU_FLAGS, "-std=c99", "-Wall", "-Wextra", "-Werror", "-ffunction-sections", "-fdata-sections")
LDFLAGS = ("-nostartfiles", "--specs=nano.specs", "--specs=nosys.specs", "-Wl,--gc-sections")
BOARD = "mps2-an386"
TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm")
CALIBRATION_LOOPS = 1_000_000  # each two instructions (subs, bne)


@dataclass(frozen=True)
class McuProfile:
    """A microcontroller the artifact must fit: its flash and RAM in bytes."""

    name: str
    flash_bytes: int
    ram_bytes: int

    def describe(self) -> str:
        return f"{self.name} ({self.flash_bytes // 1024} KB flash, {self.ram_bytes // 1024} KB RAM)"


MCU_PROFILES: dict[str, McuProfile] = {p.name: p for p in (McuProfile("cortex-m4", 256 * 1024, 64 * 1024),)}


@dataclass(frozen=True)
class Footprint:
    """What the minimal firmware needs: flash and RAM in bytes, with their parts."""

    text_bytes: int
    rodata_bytes: int
    data_bytes: int
    bss_bytes: int
    stack_bytes: int
    model_text_bytes: int  # model.c + kernels.c alone (text + rodata)

    @property
    def flash_bytes(self) -> int:
        return self.text_bytes + self.rodata_bytes + self.data_bytes

    @property
    def ram_bytes(self) -> int:
        return self.data_bytes + self.bss_bytes + self.stack_bytes


@dataclass(frozen=True)
class QemuRun:
    """Outputs of the rows run on QEMU and instructions per inference (None when not counted)."""

    outputs: np.ndarray
    instructions: int | None


def missing_tools() -> list[str]:
    """The cross tools not on PATH (empty when all are)."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


_LINKER_SCRIPT = """
MEMORY { FLASH (rx) : ORIGIN = 0x00000000, LENGTH = 4M
         RAM (rwx)  : ORIGIN = 0x20000000, LENGTH = 4M }
ENTRY(reset_handler)
SECTIONS {
  .text : { KEEP(*(.vectors)) *(.text*) } > FLASH
  .rodata : { *(.rodata*) . = ALIGN(4); } > FLASH
  .ARM.exidx : { *(.ARM.exidx*) } > FLASH
  _data_load = LOADADDR(.data);
  .data : { _data_start = .; *(.data*) . = ALIGN(4); _data_end = .; } > RAM AT > FLASH
  .bss (NOLOAD) : { _bss_start = .; *(.bss*) *(COMMON) . = ALIGN(4); _bss_end = .; } > RAM
  _stack_top = ORIGIN(RAM) + LENGTH(RAM);
}
"""

# Startup and semihosting, by hand: a vector table, .data/.bss set-up, and the two semihosting calls used
# (SYS_WRITE0 to print, SYS_EXIT to stop QEMU); a device's own startup file replaces all of it.
_STARTUP = r"""
#include <stdint.h>
extern uint32_t _data_load, _data_start, _data_end, _bss_start, _bss_end, _stack_top;
int main(void);
static int semihost(int op, const void *arg)
{
    register int r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}
void ls_print(const char *text) { semihost(0x04, text); }
void ls_exit(int status)
{
    uint32_t block[2] = {0x20026u, (uint32_t)status}; /* ADP_Stopped_ApplicationExit */
    semihost(0x20, block);
    semihost(0x18, (const void *)0x20026u);
    for (;;) {}
}
void reset_handler(void)
{
    uint32_t *src = &_data_load, *dst = &_data_start;
    while (dst < &_data_end) { *dst++ = *src++; }
    for (dst = &_bss_start; dst < &_bss_end;) { *dst++ = 0; }
    ls_exit(main());
}
static void fault_handler(void) { ls_print("FAULT\n"); ls_exit(3); }
__attribute__((section(".vectors"), used)) static const void *vectors[16] = {
    &_stack_top, (void *)reset_handler, (void *)fault_handler, (void *)fault_handler, (void *)fault_handler,
    (void *)fault_handler, (void *)fault_handler, 0, 0, 0, 0, (void *)fault_handler, 0, 0,
    (void *)fault_handler, (void *)fault_handler};
"""

_MINIMAL_MAIN = r"""
#include "leanserve.h"
static float input[LEANSERVE_INPUT_SIZE];
static float output[LEANSERVE_OUTPUT_SIZE];
static uint32_t scratch[(LEANSERVE_SCRATCH_BYTES + 3) / 4];
int main(void) { return leanserve_predict(input, output, scratch); }
"""

_TEST_MAIN = r"""
#include "leanserve.h"
#include "rows.h"
void ls_print(const char *text);
#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
static float output[LEANSERVE_OUTPUT_SIZE];
static uint32_t scratch[(LEANSERVE_SCRATCH_BYTES + 3) / 4];
static void print_hex(const char *tag, uint32_t value)
{
    char line[24];
    int i = 0, shift;
    while (*tag) { line[i++] = *tag++; }
    for (shift = 28; shift >= 0; shift -= 4) { line[i++] = "0123456789abcdef"[(value >> shift) & 15u]; }
    line[i++] = '\n';
    line[i] = 0;
    ls_print(line);
}
static uint32_t ticks_since(uint32_t start) { return (start - SYST_CVR) & 0xFFFFFFu; }
int main(void)
{
    uint32_t r, i, start, loops = CALIBRATION_LOOPS;
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 5u; /* enabled, processor clock, no interrupt */
    start = SYST_CVR;
    __asm__ volatile("1: subs %0, %0, #1\n bne 1b" : "+r"(loops) : : "cc");
    print_hex("CAL ", ticks_since(start));
    for (r = 0; r < ROWS; ++r) {
        start = SYST_CVR;
        if (leanserve_predict(rows[r], output, scratch) != 0) { return 2; }
        print_hex("TICKS ", ticks_since(start));
        for (i = 0; i < LEANSERVE_OUTPUT_SIZE; ++i) {
            union { float f; uint32_t u; } bits;
            bits.f = output[i];
            print_hex("OUT ", bits.u);
        }
    }
    return 0;
}
"""


def _run(command: list[str], what: str, timeout_s: float = 300) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout_s)
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[-300:])
        raise CompileError(f"{what} failed: {first}")
    return done.stdout


def _link(sources: Path, work: Path, main_source: str, name: str, extra_defines: tuple[str, ...] = ()) -> Path:
    (work / "startup.c").write_text(_STARTUP, encoding="utf-8")
    (work / "link.ld").write_text(_LINKER_SCRIPT, encoding="utf-8")
    (work / f"{name}_main.c").write_text(main_source, encoding="utf-8")
    elf = work / f"{name}.elf"
    _run(["arm-none-eabi-gcc", *CFLAGS, "-fstack-usage", *extra_defines, f"-I{sources}", f"-I{work}",
          "-T", str(work / "link.ld"), *LDFLAGS, "-o", str(elf), str(work / "startup.c"), str(work / f"{name}_main.c"),
          str(sources / "model.c"), str(sources / "kernels.c")], f"cross-compiling {name} firmware for Cortex-M4")
    return elf


def _sections(elf: Path) -> dict[str, int]:
    out = _run(["arm-none-eabi-size", "-A", str(elf)], "arm-none-eabi-size")
    sizes = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
            sizes[parts[0]] = int(parts[1])
    return sizes


def _stack_bytes(work: Path) -> int:
    """The deepest call chain's stack: leanserve_predict -> run_layers -> the largest kernel frame, from
    gcc's -fstack-usage files (the kernels call no further functions that gcc did not inline)."""
    frames: dict[str, int] = {}
    for su in work.glob("*.su"):
        for line in su.read_text(encoding="utf-8").splitlines():
            match = re.match(r".*:(\w+)\s+(\d+)\s+(\w+)", line)
            if match:
                frames[match.group(1)] = max(frames.get(match.group(1), 0), int(match.group(2)))
    kernels = [size for name, size in frames.items() if name.startswith("ls_")]
    return frames.get("leanserve_predict", 0) + frames.get("run_layers", 0) + max(kernels, default=0) + 64  # + main


def footprint(sources: Path, work: Path) -> Footprint:
    """Flash and RAM of the minimal firmware for ``sources`` (and of the model's objects alone)."""
    work.mkdir(parents=True, exist_ok=True)
    elf = _link(sources, work, _MINIMAL_MAIN, "minimal")
    sections = _sections(elf)
    objects = []
    for name in ("model.c", "kernels.c"):
        obj = work / f"{name}.o"
        _run(["arm-none-eabi-gcc", *CFLAGS, "-c", "-o", str(obj), str(sources / name)], f"cross-compiling {name}")
        objects.append(obj)
    model = sum(size for obj in objects for section, size in _sections(obj).items()
                if section.startswith((".text", ".rodata")))
    return Footprint(sections.get(".text", 0) + sections.get(".ARM.exidx", 0), sections.get(".rodata", 0),
                     sections.get(".data", 0), sections.get(".bss", 0), _stack_bytes(work), model)


def run_on_qemu(sources: Path, rows: np.ndarray, output_size: int, work: Path, timeout_s: float = 120) -> QemuRun:
    """Run float ``rows`` through the firmware on QEMU's mps2-an386; returns the outputs [rows, output_size]
    and instructions per inference (median over rows)."""
    work.mkdir(parents=True, exist_ok=True)
    rows = np.ascontiguousarray(rows, np.float32).reshape(len(rows), -1)
    values = ",\n".join("{" + ", ".join(_c_float(v) for v in row) + "}" for row in rows)
    (work / "rows.h").write_text(f"#define ROWS {len(rows)}\nstatic const float rows[{len(rows)}][{rows.shape[1]}] = {{\n"
                                 f"{values}\n}};\n", encoding="utf-8")
    elf = _link(sources, work, _TEST_MAIN, "test", (f"-DCALIBRATION_LOOPS={CALIBRATION_LOOPS}u",))
    command = ["qemu-system-arm", "-M", BOARD, "-cpu", "cortex-m4", "-nographic", "-monitor", "none", "-serial", "none",
               "-semihosting-config", "enable=on,target=native", "-icount", "shift=0", "-kernel", str(elf)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise CompileError(f"the firmware did not finish on QEMU {BOARD} within {timeout_s:.0f} s") from exc
    text = done.stdout + done.stderr
    if done.returncode != 0 or "FAULT" in text:
        raise CompileError(f"the firmware failed on QEMU {BOARD} (exit status {done.returncode}): {text.strip()[-300:]}")
    words = [(tag, int(value, 16)) for tag, value in re.findall(r"^(CAL|TICKS|OUT) ([0-9a-f]{8})$", text, re.M)]
    outputs = np.array([v for t, v in words if t == "OUT"], np.uint32).view(np.float32)
    if outputs.size != len(rows) * output_size:
        raise CompileError(f"the firmware on QEMU printed {outputs.size} outputs, expected {len(rows) * output_size}")
    calibration = next((v for t, v in words if t == "CAL"), 0)
    ticks = sorted(v for t, v in words if t == "TICKS")
    instructions = (round(ticks[len(ticks) // 2] * 2 * CALIBRATION_LOOPS / calibration)
                    if calibration and ticks else None)
    return QemuRun(outputs.reshape(len(rows), output_size), instructions)


def _c_float(value: float) -> str:
    return f"{np.float32(value).item()!r}f".replace("inf", "INFINITY")


def check_on_cortex_m(sources: Path, rows: np.ndarray, output_size: int) -> tuple[Footprint, QemuRun]:
    """Footprint and a QEMU run of ``sources`` in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="leanserve-cortex-m-") as tmp:
        return footprint(sources, Path(tmp) / "minimal"), run_on_qemu(sources, rows, output_size, Path(tmp) / "test")
