// cuda_emu.h: gpubp's CUDA kernels, unchanged, compiled by a host C++ compiler and run on the CPU.
//
// This header gives the CUDA constructs the kernels in kernels/*.cu use a C++ meaning:
//   __global__ __device__ __forceinline__ __restrict__ __shared__ (static: the blocks of a launch
//   run one after another, so one copy serves every block), threadIdx / blockIdx / blockDim /
//   gridDim (x only), __syncthreads, __shfl_xor_sync (full mask; float, double, int),
//   atomicAdd (unsigned long long), atomicExch (int), __int_as_float, __longlong_as_double,
//   float4 / double2 / make_*, and the float and double maths overloads (those of <cmath>).
//
// A launch runs its blocks one after another, in forward, reverse or shuffled order, and the
// threads of a block concurrently: as fibers on one OS thread (the default; fast, and the thread
// order follows the block order), or as one OS thread each when EMU_THREADS is 1 (for the
// ThreadSanitizer build, where a missing __syncthreads is a reported data race).
//
// What is undefined on a GPU is an error here, never a silent pass: a shuffle whose full mask
// names a lane that has exited or does not exist (a partial warp), a shuffle reached at different
// call sites by the lanes of a warp (a shuffle inside a divergent branch), a lane that waits at
// __syncthreads while its warp waits at a shuffle, a barrier reached at different call sites or
// not reached by every thread of the block, a deadlock. The error aborts the launch and is
// returned to the caller with the kernel's source line.
#pragma once

#include <math.h>  // the C++ <math.h> brings the float overloads of exp, tanh, fmax... to ::

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr: the flush-to-zero and denormals-are-zero bits
#endif

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef EMU_THREADS
#define EMU_THREADS 0
#endif
#if !EMU_THREADS
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <new>
#endif
#if defined(__SANITIZE_ADDRESS__) && !EMU_THREADS
#define EMU_ASAN_FIBERS 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>  // tells AddressSanitizer which stack is live
#else
#define EMU_ASAN_FIBERS 0
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct uint3 {
    unsigned x, y, z;
};
typedef uint3 dim3;

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) double2 {
    double x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
inline double __longlong_as_double(long long i) {
    double d;
    std::memcpy(&d, &i, sizeof d);
    return d;
}

// CUDA's round-to-nearest products and sums that are never contracted into an FMA: the volatile
// keeps g++'s -ffp-contract=fast from fusing them after inlining
inline double __dmul_rn(double x, double y) {
    volatile double p = x * y;
    return p;
}
inline double __dadd_rn(double x, double y) {
    volatile double s = x + y;
    return s;
}

// relaxed, as CUDA's atomics are
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }

namespace emu {

// --- one emulated thread and the block it belongs to ---------------------------------------------

enum ThreadState : int { RUNNING = 0, AT_BARRIER = 1, AT_SHUFFLE = 2, EXITED = 3 };

struct Thread {
    uint3 idx{0, 0, 0};
    int tid = 0;
};

struct Abort {};  // thrown to unwind a thread's kernel once the launch has failed

struct Warp {
    unsigned gen = 0;       // shuffles completed by this warp
    int arrived = 0;        // lanes waiting at the current shuffle
    int site = -1;          // source line of the current shuffle
    int present = 32;       // lanes that exist (< 32 in the last warp of a partial block)
    int exited = 0;         // lanes that have returned from the kernel
    uint64_t in[32] = {};   // values deposited for the current shuffle
    uint64_t out[2][32] = {};  // the values of the last two completed shuffles
#if EMU_THREADS
    std::condition_variable cv;
#endif
};

struct Block {
    int nthreads = 0;
    std::vector<Warp> warps;
    std::vector<int> state;
    unsigned bar_gen = 0;
    int bar_arrived = 0;
    int bar_site = -1;
    int exited = 0;
    bool failed = false;
    std::string error;
    unsigned long long progress = 0;  // any state change; the fiber scheduler's deadlock test
#if EMU_THREADS
    std::mutex m;
    std::condition_variable bar_cv;
#endif
};

inline uint3 g_blockIdx{0, 0, 0};
inline dim3 g_blockDim{1, 1, 1};
inline dim3 g_gridDim{1, 1, 1};
inline Block* g_block = nullptr;
inline const char* g_kernel = "";

#if EMU_THREADS
inline thread_local Thread* t_self = nullptr;
inline Thread* self() { return t_self; }
#else
inline Thread* g_current = nullptr;
inline Thread* self() { return g_current; }
#endif

#if EMU_THREADS
typedef std::unique_lock<std::mutex> Lock;
inline Lock lock_block(Block& b) { return Lock(b.m); }
#else
struct Lock {
    Lock() {}  // user-provided, so an unused lock is not a warning
    ~Lock() {}
};
inline Lock lock_block(Block&) { return Lock(); }
#endif

inline void notify_all(Block& b) {
#if EMU_THREADS
    b.bar_cv.notify_all();
    for (Warp& w : b.warps) w.cv.notify_all();
#else
    (void)b;
#endif
}

// Record the first error of the launch and unwind the calling thread. Called with the lock held.
[[noreturn]] inline void fail(Block& b, const std::string& what) {
    if (!b.failed) {
        b.failed = true;
        b.error = std::string(g_kernel) + ", block " + std::to_string(g_blockIdx.x) +
                  ", thread " + std::to_string(self()->tid) + ": " + what;
    }
    b.progress++;
    notify_all(b);
    throw Abort{};
}

#if !EMU_THREADS
void yield_to_scheduler();
#endif

// Block the calling thread until pred() holds (or the launch failed: then unwind).
template <class Pred>
inline void wait_until(Block& b, Lock& lk, int warp, Pred pred) {
#if EMU_THREADS
    std::condition_variable& cv = warp < 0 ? b.bar_cv : b.warps[warp].cv;
    const bool ok = cv.wait_for(lk, std::chrono::seconds(20), [&] { return b.failed || pred(); });
    if (!ok) fail(b, "deadlock: no thread of the block made progress for 20 s");
#else
    (void)lk;
    (void)warp;
    while (!b.failed && !pred()) yield_to_scheduler();
#endif
    if (b.failed) throw Abort{};
}

inline std::string line(int site) { return "line " + std::to_string(site); }

// --- __syncthreads ---------------------------------------------------------------------------------

inline void sync_block(int site) {
    Block& b = *g_block;
    Lock lk = lock_block(b);
    const int tid = self()->tid;
    if (b.failed) throw Abort{};
    if (b.exited > 0) {
        fail(b, "__syncthreads at " + line(site) + " after " + std::to_string(b.exited) +
                    " thread(s) of the block returned: a barrier every thread does not reach");
    }
    if (b.bar_arrived == 0) {
        b.bar_site = site;
    } else if (b.bar_site != site) {
        fail(b, "__syncthreads reached at " + line(site) + " while others wait at " +
                    line(b.bar_site) + ": a barrier inside a divergent branch");
    }
    const Warp& w = b.warps[tid >> 5];
    if (w.arrived > 0) {
        fail(b, "__syncthreads at " + line(site) + " while lanes of the same warp wait at the "
                "shuffle at " + line(w.site) + ": a shuffle inside a divergent branch");
    }
    b.state[tid] = AT_BARRIER;
    const unsigned gen = b.bar_gen;
    b.progress++;
    if (++b.bar_arrived == b.nthreads) {
        b.bar_arrived = 0;
        b.bar_gen++;
        notify_all(b);
    } else {
        wait_until(b, lk, -1, [&] { return b.bar_gen != gen; });
    }
    b.state[tid] = RUNNING;
}

// --- __shfl_xor_sync --------------------------------------------------------------------------------

template <class T>
inline T shfl_xor(unsigned mask, T value, int lane_mask, int width, int site) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of this type");
    Block& b = *g_block;
    Lock lk = lock_block(b);
    const int tid = self()->tid;
    const int lane = tid & 31;
    Warp& w = b.warps[tid >> 5];
    if (b.failed) throw Abort{};
    if (mask != 0xffffffffu || width != 32) {
        fail(b, "__shfl_xor_sync at " + line(site) + " with a mask other than 0xffffffff or a "
                "width other than 32 (not used by gpubp, so not emulated)");
    }
    if (w.present < 32) {
        fail(b, "__shfl_xor_sync at " + line(site) + " in a warp of " + std::to_string(w.present) +
                    " threads: the full mask names lanes that do not exist (a block size that "
                    "is not a multiple of 32 needs a guard)");
    }
    if (w.exited > 0) {
        fail(b, "__shfl_xor_sync at " + line(site) + " names " + std::to_string(w.exited) +
                    " lane(s) of the warp that have returned from the kernel");
    }
    for (int k = 0; k < 32; ++k) {
        if (b.state[(tid & ~31) + k] == AT_BARRIER) {
            fail(b, "__shfl_xor_sync at " + line(site) + " while lane " + std::to_string(k) +
                        " of the warp waits at __syncthreads: divergent code");
        }
    }
    if (w.arrived == 0) {
        w.site = site;
    } else if (w.site != site) {
        fail(b, "lanes of one warp at the shuffles of " + line(site) + " and " + line(w.site) +
                    ": a shuffle inside a divergent branch");
    }
    const int src = lane ^ lane_mask;
    if (lane_mask < 0 || src >= 32) {
        fail(b, "__shfl_xor_sync at " + line(site) + ": lane mask " + std::to_string(lane_mask) +
                    " names a lane outside the warp");
    }
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    w.in[lane] = bits;
    b.state[tid] = AT_SHUFFLE;
    const unsigned gen = w.gen;
    b.progress++;
    if (++w.arrived == 32) {
        std::memcpy(w.out[gen & 1u], w.in, sizeof w.in);
        w.arrived = 0;
        w.gen++;
#if EMU_THREADS
        w.cv.notify_all();
#endif
    } else {
        wait_until(b, lk, tid >> 5, [&] { return w.gen != gen; });
    }
    b.state[tid] = RUNNING;
    T out;
    std::memcpy(&out, &w.out[gen & 1u][src], sizeof(T));
    return out;
}

// A thread returns from the kernel: lanes and threads still waiting for it are in error.
inline void thread_exit() {
    Block& b = *g_block;
    Lock lk = lock_block(b);
    const int tid = self()->tid;
    Warp& w = b.warps[tid >> 5];
    b.state[tid] = EXITED;
    b.exited++;
    w.exited++;
    b.progress++;
    if (b.failed) return;
    if (w.arrived > 0) {
        b.failed = true;
        b.error = std::string(g_kernel) + ", block " + std::to_string(g_blockIdx.x) +
                  ", thread " + std::to_string(tid) + ": returned while lanes of its warp wait " +
                  "at the shuffle at " + line(w.site) + " that names it";
        notify_all(b);
    } else if (b.bar_arrived > 0) {
        b.failed = true;
        b.error = std::string(g_kernel) + ", block " + std::to_string(g_blockIdx.x) +
                  ", thread " + std::to_string(tid) + ": returned while " +
                  std::to_string(b.bar_arrived) + " thread(s) wait at __syncthreads at " +
                  line(b.bar_site) + ": a barrier every thread does not reach";
        notify_all(b);
    }
}

// --- running one block -------------------------------------------------------------------------------

// The order in which blocks (and, with fibers, the threads of a block) are taken.
enum Order : int { FORWARD = 0, REVERSE = 1, SHUFFLED = 2 };

inline std::vector<int> ordering(int n, int order, unsigned long long seed) {
    std::vector<int> v(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) v[static_cast<size_t>(i)] = i;
    if (order == REVERSE) {
        std::reverse(v.begin(), v.end());
    } else if (order == SHUFFLED) {
        std::mt19937_64 gen(seed);
        std::shuffle(v.begin(), v.end(), gen);
    }
    return v;
}

typedef void (*Body)(void* ctx);

#if EMU_THREADS

inline void run_thread(Thread* t, Body body, void* ctx) {
    t_self = t;
    try {
        body(ctx);
    } catch (const Abort&) {
    }
    thread_exit();
    t_self = nullptr;
}

inline void run_block(Block& b, int order, unsigned long long seed, Body body, void* ctx) {
    std::vector<Thread> threads(static_cast<size_t>(b.nthreads));
    std::vector<std::thread> os;
    os.reserve(threads.size());
    for (int i : ordering(b.nthreads, order, seed)) {
        Thread& t = threads[static_cast<size_t>(i)];
        t.tid = i;
        t.idx = uint3{static_cast<unsigned>(i), 0, 0};
        os.emplace_back(run_thread, &t, body, ctx);
    }
    for (std::thread& t : os) t.join();
}

#else  // fibers

// Switching fibers: on x86-64 a few instructions that save the callee-saved registers and swap
// stacks (tens of nanoseconds); elsewhere ucontext, whose swapcontext also saves and restores the
// signal mask by a system call (about ten times slower). Kernels never touch the floating-point
// control registers, so those are not switched.
#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
#define EMU_FAST_SWITCH 1
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl emu_switch_stack\n"
    ".hidden emu_switch_stack\n"
    ".type emu_switch_stack,@function\n"
    "emu_switch_stack:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size emu_switch_stack, .-emu_switch_stack\n");
struct Context {
    void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { emu_switch_stack(&from.sp, to.sp); }
#else
#define EMU_FAST_SWITCH 0
struct Context {
    ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// A fiber's stack: mapped memory with an inaccessible guard page below it (stacks grow down),
// so a frame that overflows faults at once instead of overwriting a neighbour's stack.
struct Stack {
    char* base = nullptr;  // the guard page; the usable stack starts one page above
    size_t page = 0, size = 0;
    Stack() = default;
    Stack(const Stack&) = delete;
    Stack& operator=(const Stack&) = delete;
    Stack(Stack&& o) noexcept : base(o.base), page(o.page), size(o.size) { o.base = nullptr; }
    ~Stack() {
        if (base != nullptr) munmap(base, page + size);
    }
    void allocate(size_t bytes) {
        page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
        size = bytes;
        void* p = mmap(nullptr, page + size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                       -1, 0);
        if (p == MAP_FAILED) throw std::bad_alloc();
        base = static_cast<char*>(p);
        mprotect(base, page, PROT_NONE);
    }
    char* get() const { return base == nullptr ? nullptr : base + page; }
    explicit operator bool() const { return base != nullptr; }
};

struct Fiber {
    Context ctx;
    Stack stack;  // untouched pages cost nothing: a launch touches only what it uses
    Thread thread;
    bool done = false;
};

inline Context g_scheduler;
inline Fiber* g_fiber = nullptr;
inline Body g_body = nullptr;
inline void* g_ctx = nullptr;
constexpr size_t FIBER_STACK = 256 * 1024;

inline const void* g_sched_bottom = nullptr;
inline size_t g_sched_size = 0;

inline void yield_to_scheduler() {
#if EMU_ASAN_FIBERS
    void* save = nullptr;
    __sanitizer_start_switch_fiber(&save, g_sched_bottom, g_sched_size);
#endif
    switch_context(g_fiber->ctx, g_scheduler);
#if EMU_ASAN_FIBERS
    __sanitizer_finish_switch_fiber(save, &g_sched_bottom, &g_sched_size);
#endif
}

inline void fiber_main() {
#if EMU_ASAN_FIBERS
    __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
#endif
    Fiber* f = g_fiber;
    try {
        g_body(g_ctx);
    } catch (const Abort&) {
    }
    thread_exit();
    f->done = true;
#if EMU_ASAN_FIBERS
    __sanitizer_start_switch_fiber(nullptr, g_sched_bottom, g_sched_size);  // this stack ends
#endif
}

#if EMU_FAST_SWITCH
// A fiber's first switch "returns" here; it never returns itself: the scheduler takes over.
[[noreturn]] inline void fiber_entry() {
    fiber_main();
    Context dead;
    switch_context(dead, g_scheduler);
    __builtin_unreachable();
}

inline void prepare(Fiber& f) {
#if EMU_ASAN_FIBERS
    // the frames a fiber left on its stack when it last ended are still marked as live
    __asan_unpoison_memory_region(f.stack.get(), FIBER_STACK);
#endif
    const auto top = reinterpret_cast<uintptr_t>(f.stack.get() + FIBER_STACK) & ~uintptr_t{15};
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                    // entered as if called: rsp % 16 == 8
    *--sp = reinterpret_cast<void*>(&fiber_entry);      // where the first switch's ret goes
    for (int i = 0; i < 6; ++i) *--sp = nullptr;        // rbp rbx r12 r13 r14 r15
    f.ctx.sp = sp;
}
#else
inline void prepare(Fiber& f) {
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc.uc_stack.ss_size = FIBER_STACK;
    f.ctx.uc.uc_link = &g_scheduler.uc;  // returning from fiber_main resumes the scheduler
    makecontext(&f.ctx.uc, fiber_main, 0);
}
#endif

inline void enter_fiber(Fiber& f) {
#if EMU_ASAN_FIBERS
    void* save = nullptr;
    __sanitizer_start_switch_fiber(&save, f.stack.get(), FIBER_STACK);
#endif
    switch_context(g_scheduler, f.ctx);
#if EMU_ASAN_FIBERS
    __sanitizer_finish_switch_fiber(save, nullptr, nullptr);
#endif
}

inline std::vector<Fiber>& fibers(size_t n) {
    static std::vector<Fiber> pool;
    if (pool.size() < n) pool.resize(n);
    return pool;
}

// Every live thread waits and none can go on (kept out of run_block, which switches stacks).
__attribute__((noinline)) inline void deadlock(Block& b, int left) {
    b.failed = true;
    b.error = std::string(g_kernel) + ", block " + std::to_string(g_blockIdx.x) + ": deadlock (" +
              std::to_string(left) + " thread(s) wait and none can proceed)";
}

inline void run_block(Block& b, int order, unsigned long long seed, Body body, void* ctx) {
    std::vector<Fiber>& pool = fibers(static_cast<size_t>(b.nthreads));
    g_body = body;
    g_ctx = ctx;
    for (int i = 0; i < b.nthreads; ++i) {
        Fiber& f = pool[static_cast<size_t>(i)];
        if (!f.stack) f.stack.allocate(FIBER_STACK);
        f.done = false;
        f.thread.tid = i;
        f.thread.idx = uint3{static_cast<unsigned>(i), 0, 0};
        prepare(f);
    }
    const std::vector<int> sequence = ordering(b.nthreads, order, seed);
    int left = b.nthreads;
    while (left > 0) {
        const unsigned long long before = b.progress;
        for (int i : sequence) {
            Fiber& f = pool[static_cast<size_t>(i)];
            if (f.done) continue;
            g_fiber = &f;
            g_current = &f.thread;
            enter_fiber(f);
            if (f.done) --left;
        }
        g_current = nullptr;
        if (left > 0 && b.progress == before && !b.failed) deadlock(b, left);
    }
}

#endif

// --- a launch ------------------------------------------------------------------------------------------

// CuPy compiles every kernel with -ftz=true: a float32 subnormal read or written by a float
// instruction is zero. On x86 the MXCSR's FTZ (bit 15) and DAZ (bit 6) bits do that for the SSE
// and AVX instructions, set for the launch of a float instantiation (its name has "<float") and
// put back afterwards; threads made during the launch inherit them. They apply to the double
// instructions of that launch too (a GPU keeps double subnormals; gpubp's float kernels use
// doubles only for sums far from 1e-308). Elsewhere nothing is flushed (DESIGN.md).
struct FlushSubnormals {
#if defined(__x86_64__) || defined(__i386__)
    unsigned saved;
    explicit FlushSubnormals(bool on) : saved(_mm_getcsr()) {
        if (on) _mm_setcsr(saved | 0x8040u);
    }
    ~FlushSubnormals() { _mm_setcsr(saved); }
#else
    explicit FlushSubnormals(bool) {}
#endif
    FlushSubnormals(const FlushSubnormals&) = delete;
    FlushSubnormals& operator=(const FlushSubnormals&) = delete;
};

// Run body(ctx) as every thread of a grid of `grid` blocks of `block` threads. Returns 0, or 1
// with the error written to err.
inline int launch(const char* name, unsigned grid, unsigned block, int order,
                  unsigned long long seed, Body body, void* ctx, char* err, size_t errlen) {
    static std::mutex one_launch_at_a_time;
    std::lock_guard<std::mutex> guard(one_launch_at_a_time);
    auto refuse = [&](const std::string& what) {
        std::snprintf(err, errlen, "%s: %s", name, what.c_str());
        return 1;
    };
    if (grid < 1 || grid > 0x7fffffffu) return refuse("grid of " + std::to_string(grid) + " blocks");
    if (block < 1 || block > 1024) {
        return refuse("block of " + std::to_string(block) + " threads (CUDA allows 1 to 1024)");
    }
    const FlushSubnormals ftz(std::strstr(name, "<float") != nullptr);
    g_kernel = name;
    g_gridDim = dim3{grid, 1, 1};
    g_blockDim = dim3{block, 1, 1};
    const std::vector<int> blocks = ordering(static_cast<int>(grid), order, seed);
    int step = 0;
    for (int bi : blocks) {
        Block b;
        b.nthreads = static_cast<int>(block);
        b.warps = std::vector<Warp>((block + 31) / 32);
        b.warps.back().present = static_cast<int>(block) - 32 * (static_cast<int>(b.warps.size()) - 1);
        b.state.assign(block, RUNNING);
        g_block = &b;
        g_blockIdx = uint3{static_cast<unsigned>(bi), 0, 0};
        run_block(b, order, seed + static_cast<unsigned long long>(++step), body, ctx);
        g_block = nullptr;
        if (b.failed) {
            std::snprintf(err, errlen, "%s", b.error.c_str());
            return 1;
        }
    }
    return 0;
}

// --- type names of kernel parameters, for the host's argument checks -----------------------------------

template <class T>
struct TypeName;
template <>
struct TypeName<float> {
    static constexpr const char* value = "float";
};
template <>
struct TypeName<double> {
    static constexpr const char* value = "double";
};
template <>
struct TypeName<int> {
    static constexpr const char* value = "int";
};
template <>
struct TypeName<long long> {
    static constexpr const char* value = "long long";
};
template <>
struct TypeName<unsigned long long> {
    static constexpr const char* value = "unsigned long long";
};

template <class P>
inline std::string param_name() {
    typedef std::remove_cv_t<P> Q;
    if constexpr (std::is_pointer<Q>::value) {
        typedef std::remove_pointer_t<Q> E;
        return std::string(std::is_const<E>::value ? "const " : "") +
               TypeName<std::remove_cv_t<E>>::value + "*";
    } else {
        return TypeName<Q>::value;
    }
}

// --- the table of kernels a library exports ---------------------------------------------------------------

struct Entry {
    const char* name;
    std::string signature;  // comma-separated parameter types
    void (*kernel)();
    void (*invoke)(void (*)(), void**);
};

template <class... P, size_t... I>
inline void invoke_with(void (*k)(P...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<P>*>(args[I])...);
}

template <class... P>
inline void invoke(void (*raw)(), void** args) {
    invoke_with(reinterpret_cast<void (*)(P...)>(raw), args, std::index_sequence_for<P...>{});
}

template <class... P>
inline Entry entry(void (*k)(P...), const char* name) {
    std::string sig;
    ((sig += (sig.empty() ? "" : ","), sig += param_name<P>()), ...);
    return Entry{name, sig, reinterpret_cast<void (*)()>(k), &invoke<P...>};
}

struct Call {
    const Entry* entry;
    void** args;
};

inline void call_body(void* ctx) {
    const Call* c = static_cast<const Call*>(ctx);
    c->entry->invoke(c->entry->kernel, c->args);
}

}  // namespace emu

#define threadIdx (::emu::self()->idx)
#define blockIdx (::emu::g_blockIdx)
#define blockDim (::emu::g_blockDim)
#define gridDim (::emu::g_gridDim)
#define __syncthreads() ::emu::sync_block(__LINE__)
#define __shfl_xor_sync(mask, value, lane_mask) \
    ::emu::shfl_xor((mask), (value), (lane_mask), 32, __LINE__)

#define EMU_EXPORT __attribute__((visibility("default")))

// The exported C entry points of a library built from one kernel family plus a list of entries:
//   EMU_EXPORT_ENTRIES(emu::entry(&gpubp::k<float, 1>, "gpubp::k<float, 1>"), ...)
#define EMU_EXPORT_ENTRIES(...)                                                                   \
    static const std::vector<::emu::Entry>& emu_entries_() {                                      \
        static const std::vector<::emu::Entry> e{__VA_ARGS__};                                    \
        return e;                                                                                 \
    }                                                                                             \
    extern "C" EMU_EXPORT int emu_count() { return static_cast<int>(emu_entries_().size()); }                \
    extern "C" EMU_EXPORT const char* emu_name(int i) { return emu_entries_()[static_cast<size_t>(i)].name; } \
    extern "C" EMU_EXPORT const char* emu_signature(int i) {                                                 \
        return emu_entries_()[static_cast<size_t>(i)].signature.c_str();                          \
    }                                                                                             \
    extern "C" EMU_EXPORT int emu_launch(int i, unsigned grid, unsigned block, int order,                    \
                              unsigned long long seed, void** args, char* err, size_t errlen) {   \
        const ::emu::Entry& e = emu_entries_()[static_cast<size_t>(i)];                          \
        ::emu::Call call{&e, args};                                                               \
        return ::emu::launch(e.name, grid, block, order, seed, &::emu::call_body, &call, err,      \
                             errlen);                                                             \
    }
