/* Runs a CPU kernel's parallel loop on the calling process's OpenMP threads (torch's) instead of
 * TVM's own thread pool.
 *
 * TVM's generated code calls its parallel loops through the library's __TVMBackendParallelLaunch
 * slot, which the runtime fills with its own pool's launcher. That pool is a second set of worker
 * threads beside torch's OpenMP team; after a torch op, torch's threads spin-wait for their next
 * region and hold the cores that TVM's workers need (a QK call right after a torch matmul ran
 * 1.7x slower than alone). longformer_tvm._threads puts lftvm_parallel_launch in that slot instead:
 * the loop's tasks then run on torch's team, as torch's own ops do.
 *
 * Linked into every CPU library (tvm_kernels/cpu/build.py); it calls no OpenMP symbol by name:
 * lftvm_threads_init is given GOMP_parallel and omp_get_max_threads of the OpenMP runtime torch
 * loaded (GNU's, or LLVM's and Intel's, which implement the same entry points), and TVM's own
 * launcher for a child made by fork(), where a GNU OpenMP team would wait for threads that do not
 * exist. The kernels use no TVMBackendParallelBarrier (longformer_tvm._threads checks), so
 * sync_handle stays NULL. */
#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <unistd.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
typedef int (*FLaunch)(FTVMParallelLambda flambda, void* cdata, int num_task);
typedef void (*FGompParallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
typedef int (*FMaxThreads)(void);

static FGompParallel gomp_parallel;
static FMaxThreads max_threads;
static FLaunch tvm_launch;
static pid_t owner;

/* Returns 0, or -1 (and changes nothing) if a pointer is missing. */
int lftvm_threads_init(void* parallel, void* threads, void* fallback) {
  if (parallel == NULL || threads == NULL || fallback == NULL) return -1;
  gomp_parallel = (FGompParallel)parallel;
  max_threads = (FMaxThreads)threads;
  tvm_launch = (FLaunch)fallback;
  owner = getpid();
  return 0;
}

typedef struct {
  FTVMParallelLambda flambda;
  void* cdata;
  int32_t num_task;
  int32_t next;
  int32_t failed;
} Job;

/* Each thread of the team takes the next task until none is left, so the tasks all run however
 * many threads the runtime gives the team (one, nested in another parallel region). */
static void run_tasks(void* data) {
  Job* job = (Job*)data;
  TVMParallelGroupEnv env = {NULL, job->num_task};
  int32_t task;
  while ((task = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED)) < job->num_task) {
    if (job->flambda(task, &env, job->cdata) != 0) __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
  }
}

/* TVMBackendParallelLaunch's contract: num_task 0 means one task per thread (here, as many as
 * omp_get_max_threads() gives the calling thread now: torch.set_num_threads sets it); returns 0,
 * or -1 if a task failed. */
int lftvm_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  if (getpid() != owner) return tvm_launch(flambda, cdata, num_task);
  int n = num_task > 0 ? num_task : max_threads();
  Job job = {flambda, cdata, n > 1 ? n : 1, 0, 0};
  if (job.num_task == 1) {
    run_tasks(&job);
  } else {
    gomp_parallel(run_tasks, &job, (unsigned)job.num_task, 0);
  }
  return job.failed ? -1 : 0;
}

#ifdef __cplusplus
}
#endif
