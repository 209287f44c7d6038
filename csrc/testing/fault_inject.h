// fault_inject.h — test-only fault injection behind the tp_test_* entry points (include/turboprefill.h).
//
// Faults that cannot be produced on demand in a test — an allocation failing at a chosen point, a model file
// truncated in the middle of a run — are armed from a test and fire at fixed points in the library. Unarmed,
// each point is one relaxed atomic load. Arming is process-wide: tests that arm a fault run one at a time.
#pragma once

#include <string>

#include "common.h"

namespace tp {

// Throws std::bad_alloc, as a failed real allocation would, when this is the allocation of `kind` that
// tp_test_fail_alloc armed. Called by the CPU backend before each activation buffer (alloc, alloc_i32) and
// before each layer's K or V buffer of a KV cache growth.
void alloc_fault_point(tp_alloc_kind kind);

// Called by GgufFile::check_intact once its check has passed: truncates `path` to the armed size when
// tp_test_truncate_after_check armed it for this path, as a writer would right after the check, during
// the run that follows.
void truncate_fault_point(const std::string& path);

}  // namespace tp
