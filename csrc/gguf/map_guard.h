// map_guard.h — turns a read of a model file's mapping past the file's end (SIGBUS) into zeros plus a flag.
//
// Weights are views of the GGUF mapping, so a file truncated while a prefill or vision encode reads it would
// kill the process with SIGBUS. Every GgufFile registers its mapping here. The process-wide SIGBUS handler
// (installed with the first registration, never removed: a handler installed after ours may chain to it)
// checks whether the faulting address lies in a registered mapping; if so it maps an anonymous zero page
// over the faulting page, records the fault in the mapping's flag and returns, so the read continues with
// zeros. The owner checks the flag after each run and discards that run's results (GgufFile::check_reads).
// Faults outside every registered mapping go to the handler that was installed before ours (or the default
// action), as if we were not there.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace tp {

// The state the handler writes for one mapping: 0 while every read was served by the file, else 1 + the
// byte offset (into the mapping) of the first read that faulted.
using MapFaultFlag = std::atomic<uint64_t>;

// Registers [base, base + len) (base page-aligned, as mmap returns it). *flag must stay valid until
// map_guard_remove. Returns the slot to pass to map_guard_remove; throws TP_ERR_IO when kMaxGuardedMaps mappings are
// registered at once or the handler cannot be installed.
int map_guard_add(const void* base, size_t len, MapFaultFlag* flag);
// Forgets a slot; call before munmap, after the last read of the mapping.
void map_guard_remove(int slot);

constexpr int kMaxGuardedMaps = 1024;

}  // namespace tp
