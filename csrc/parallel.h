// Threads for the recurrent loop: a team that stays together for all time steps of a layer,
// meeting at a spin barrier once or twice a step, instead of one fork/join per step.
//
// The team is torch's OpenMP team (one thread pool for the process, sized by
// torch.set_num_threads), so lstm_ext never runs more threads than torch would.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LSTM_EXT_CPU_RELAX() _mm_pause()
#else
#define LSTM_EXT_CPU_RELAX() std::this_thread::yield()
#endif

namespace lstm_ext::inline CPU_CAPABILITY {

class SpinBarrier {
 public:
  // A few microseconds: a step's partner normally arrives well within that. Past it the partner
  // is likely descheduled (another process on its core), and spinning would only delay it.
  static constexpr int kSpinsBeforeYield = 1 << 10;

  // Every member calls this with the same size before its first wait.
  void set_size(int size) { size_.store(size, std::memory_order_relaxed); }

  void arrive_and_wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == size_.load(std::memory_order_relaxed)) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < kSpinsBeforeYield) {
        LSTM_EXT_CPU_RELAX();
      } else {
        std::this_thread::yield();  // oversubscribed: let the late member run
      }
    }
  }

 private:
  std::atomic<int> size_{1};
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

// One member's place in a team working on a range of columns together.
struct TeamMember {
  int rank = 0;
  int size = 1;
  SpinBarrier* barrier = nullptr;

  void sync() const {
    if (size > 1) barrier->arrive_and_wait();
  }
  // This member's share [begin, end) of [0, n), in multiples of `align` where possible.
  std::pair<int64_t, int64_t> share(int64_t n, int64_t align) const {
    const int64_t blocks = (n + align - 1) / align;
    const int64_t begin = std::min(n, blocks * rank / size * align);
    const int64_t end = std::min(n, blocks * (rank + 1) / size * align);
    return {begin, end};
  }
};

// Calls fn(thread, threads) on up to max_threads threads of the OpenMP team, all running at once
// (so they may wait for each other). An exception in any thread is rethrown here.
template <typename Fn>
void run_on_threads(int max_threads, const Fn& fn) {
#ifdef _OPENMP
  if (max_threads > 1 && !at::in_parallel_region() && at::get_num_threads() > 1) {
    std::exception_ptr error;
    std::atomic_flag error_set = ATOMIC_FLAG_INIT;
#pragma omp parallel
    {
      const int threads = std::min(omp_get_num_threads(), max_threads);
      const int thread = omp_get_thread_num();
      if (thread < threads) {
        try {
          fn(thread, threads);
        } catch (...) {
          if (!error_set.test_and_set()) error = std::current_exception();
        }
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  fn(0, 1);
}

}  // namespace lstm_ext
