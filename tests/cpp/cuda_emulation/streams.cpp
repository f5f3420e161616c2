// Streams and events of the CUDA emulation (cuda_emulation.h): launches on a stream made by
// cudaStreamCreateWithFlags are queued, and run when another stream waits on an event recorded after
// them or at a synchronize. Everything else runs at once, in program order, as before.
#include <algorithm>
#include <memory>
#include <vector>

#include "cuda_emulation.h"

struct CUstream_st {
  std::vector<std::function<void()>> queued;
  size_t done = 0;  // queued[0, done) have run

  /// Runs the queued launches up to (not including) `upto`.
  void run_until(size_t upto) {
    while (done < std::min(upto, queued.size())) queued[done++]();
  }
};

struct CUevent_st {
  CUstream_st* stream = nullptr;  // a created stream, or nullptr (recorded on an immediate stream)
  size_t upto = 0;                // the stream's queue length at the record
};

namespace {

std::vector<std::unique_ptr<CUstream_st>>& created_streams() {
  static std::vector<std::unique_ptr<CUstream_st>> streams;
  return streams;
}

CUstream_st* created(cudaStream_t stream) {
  for (const auto& owned : created_streams()) {
    if (owned.get() == stream) return owned.get();
  }
  return nullptr;  // the default stream, or a handle this API did not make
}

}  // namespace

namespace batchllm_emulation {

bool defer_to_stream(cudaStream_t stream, std::function<void()> work) {
  CUstream_st* queue = created(stream);
  if (queue == nullptr) return false;
  queue->queued.push_back(std::move(work));
  return true;
}

void flush_streams() {
  for (const auto& stream : created_streams()) stream->run_until(stream->queued.size());
}

}  // namespace batchllm_emulation

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned /*flags*/) {
  created_streams().push_back(std::make_unique<CUstream_st>());
  *stream = created_streams().back().get();
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  CUstream_st* queue = created(stream);
  if (queue == nullptr) return cudaErrorInvalidValue;
  queue->run_until(queue->queued.size());  // as on a device: queued work still completes
  auto& streams = created_streams();
  streams.erase(std::remove_if(streams.begin(), streams.end(), [&](const auto& s) { return s.get() == queue; }),
                streams.end());
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t /*stream*/, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;  // the emulation has no graphs
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned /*flags*/) {
  *event = new CUevent_st();
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  event->stream = created(stream);
  event->upto = event->stream != nullptr ? event->stream->queued.size() : 0;
  return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t /*stream*/, cudaEvent_t event, unsigned /*flags*/) {
  // Whatever the waiting stream runs next sees the recorded work done: run it now. (Work on the
  // waiting stream already queued before the wait is not reordered: queues run in their own order.)
  if (event->stream != nullptr) event->stream->run_until(event->upto);
  return cudaSuccess;
}
