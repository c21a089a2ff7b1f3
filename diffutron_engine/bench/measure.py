"""What every benchmark measures alike: peak working memory of a region, the device sync before a clock
is read, and the machine a report was made on. torch is imported only where CUDA is measured, so
cpu_name() serves scripts that never load it."""

from __future__ import annotations

import platform


def _return_freed_memory_to_the_os() -> None:
    """glibc raises its mmap threshold after large frees and then keeps freed buffers resident, so a
    later region's resident-set peak would undercount; pinning the threshold (which also disables the
    dynamic adjustment) makes every large buffer an mmap that is returned on free."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak working memory of a region in MiB (`peak`, None where it cannot be read): CUDA allocator peak,
    or on Linux the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs)
    above the RSS at the start."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if not self.cuda:
            _return_freed_memory_to_the_os()

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.base = self._status("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            hwm = self._status("VmHWM")
            self.peak = None if self.base is None or hwm is None else max(hwm - self.base, 0) / 2**20


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read next measures it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def machine_info(device: str) -> dict:
    """The hardware and software record every report carries."""
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "cpu": cpu_name()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
