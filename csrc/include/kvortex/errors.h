// The one error type of the KVortex C++ core.
//
// Core code throws kvortex::Error with a code; csrc/bindings/errors.cc maps every code to the
// Python class of the same name in kvortex/errors.py, so the native backend raises exactly the
// types the pure-Python fallback raises.
#pragma once

#include <stdexcept>
#include <string>

namespace kvortex {

enum class ErrorCode {
  kInvalidArgument,  // -> InvalidArgumentError (ValueError)
  kInvalidType,      // -> InvalidTypeError (TypeError)
  kQueueTimeout,     // -> QueueTimeout (TimeoutError)
  kQueueClosed,      // -> QueueClosed (RuntimeError)
  kSlotError,        // -> SlotError (ValueError)
  kPoolClosed,       // -> PoolClosed (RuntimeError)
  kSystem,           // -> OSError (a failing system call; message carries errno text)
  kTransfer,         // -> TransferError (RuntimeError): a failed CUDA call or copy
};

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace kvortex
