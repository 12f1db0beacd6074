/* A transparent wrapper for ffmpeg/ffprobe that logs what each invocation cost, for
 * benchmarks/bench_ceiling.py. Built there as <dir>/ffmpeg and <dir>/ffprobe with
 * -DREAL='"/usr/bin/ffmpeg"' etc. and put first on the pipeline's PATH (imaker finds its
 * tools with shutil.which). It forks, execs the real tool with the same arguments and
 * standard streams, closes its own copies of them (so pipes see EOF when the tool exits),
 * waits, and appends one line to $IMAKER_BENCH_TOOL_LOG with one write(2) (O_APPEND):
 *   start<TAB>end<TAB>pid<TAB>ppid<TAB>user_s<TAB>sys_s<TAB>status<TAB>argv (0x1f-separated)
 * times are CLOCK_REALTIME seconds (comparable with Dagster's event timestamps), CPU from
 * wait4's rusage of the tool (and anything it waited for). SIGTERM/SIGINT/SIGHUP are
 * passed on to the tool; the exit status is the tool's. Cost: one fork+exec+wait, well
 * under a millisecond of CPU per invocation. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef REAL
#error "build with -DREAL='\"/path/to/the/tool\"'"
#endif

static pid_t child = -1;

static void forward(int sig) {
    if (child > 0) kill(child, sig);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    const char *log = getenv("IMAKER_BENCH_TOOL_LOG");
    argv[0] = (char *)REAL;
    if (!log || !*log) {
        execv(REAL, argv);
        perror(REAL);
        return 127;
    }
    double start = now();
    child = fork();
    if (child < 0) {
        perror("fork");
        return 127;
    }
    if (child == 0) {
        execv(REAL, argv);
        perror(REAL);
        _exit(127);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    close(0);
    close(1);
    close(2);
    int status = 0;
    struct rusage ru;
    while (wait4(child, &status, 0, &ru) < 0) {
        if (errno != EINTR) return 127;
    }
    double end = now();
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    if (buf) {
        len = snprintf(buf, cap, "%.6f\t%.6f\t%d\t%d\t%.6f\t%.6f\t%d\t", start, end, (int)child,
                       (int)getppid(), ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6,
                       ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6, status);
        for (int i = 0; i < argc && len + 2 < cap; i++) {
            const char *a = i == 0 ? REAL : argv[i];
            for (; *a && len + 2 < cap; a++) buf[len++] = (*a == '\n' || *a == '\t') ? ' ' : *a;
            buf[len++] = i + 1 < argc ? '\x1f' : '\n';
        }
        if (buf[len - 1] != '\n') buf[len++] = '\n';
        int fd = open(log, O_WRONLY | O_APPEND | O_CREAT, 0644);
        if (fd >= 0) {
            ssize_t w = write(fd, buf, len);
            (void)w;
            close(fd);
        }
    }
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) {
        signal(WTERMSIG(status), SIG_DFL);
        raise(WTERMSIG(status));
    }
    return 127;
}
