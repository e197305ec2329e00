//! The supervising process that stands between the agent and each command,
//! so a command never outlives its agent, however the agent ends.
//!
//! A command is spawned as usual (its own process group, pipes, working
//! directory), but just before the program is executed the forked child
//! forks once more: the inner child goes on to execute the program, the
//! outer one stays behind as the program's supervisor. The supervisor is the
//! process the agent spawned and the leader of the command's process group,
//! so the agent's cancellation and timeout keep signalling one group. It
//! blocks every signal it can, waits for the program and exits with the
//! program's status (`128 + n` for a program killed by signal `n`).
//!
//! The supervisor watches the agent through a *lifeline*: a pipe created
//! once per agent process, whose write end only the agent holds and no one
//! ever writes to. The kernel closes it when the agent process ends, for any
//! reason (`kill -9` included), and the supervisor's end then reports
//! end-of-file: it sends SIGTERM to the group, waits for the program up to
//! the kill grace, and SIGKILLs the group, itself included.
//!
//! Why not `PR_SET_PDEATHSIG` on the program: that signal fires when the
//! *thread* that forked the child exits, not the process (a runtime's
//! blocking-pool thread that retires would kill a healthy command), and it
//! reaches only the direct child, never the processes that child started.
//! The lifeline follows the agent process, and the supervisor signals the
//! whole group. The program does get `PR_SET_PDEATHSIG` (SIGKILL) on Linux,
//! tied to its supervisor: a supervisor is single-threaded, so there it
//! means exactly "the supervisor died".
//!
//! Everything that runs in the forked processes is limited to
//! async-signal-safe system calls: no allocation, no locks, no panics.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::process::Command;

/// The descriptor the supervisor keeps its end of the lifeline at; every
/// descriptor above it is closed.
const LIFELINE_FD: RawFd = 3;

/// How often a supervisor without a pidfd (kernels before 5.3) checks
/// whether its program exited, and how often any supervisor checks during
/// the grace after losing its agent.
const POLL_MS: i32 = 10;

/// The most descriptors a supervisor closes one by one where `close_range`
/// is missing (kernels before 5.9).
const MAX_CLOSE_LOOP: libc::c_int = 1 << 20;

/// The agent's end of every supervisor's lifeline: held for the life of the
/// process and never written to, so it closes exactly when the process ends.
#[derive(Debug)]
struct Lifeline {
    reader: io::PipeReader,
    _writer: io::PipeWriter,
}

static LIFELINE: OnceLock<Lifeline> = OnceLock::new();

/// The read end of this process's lifeline, created on first use. Both ends
/// are close-on-exec, so no executed program holds the write end.
pub(crate) fn lifeline() -> io::Result<RawFd> {
    if let Some(lifeline) = LIFELINE.get() {
        return Ok(lifeline.reader.as_raw_fd());
    }
    let (mut reader, writer) = io::pipe()?;
    // A process started with stdio closed may get descriptors 0 to 2, which
    // the spawning machinery replaces with the command's pipes before the
    // supervisor starts; a duplicate is numbered 3 or above.
    if reader.as_raw_fd() <= 2 {
        reader = reader.try_clone()?;
    }
    // A lifeline created by a racing caller wins; this one is dropped.
    let lifeline = LIFELINE.get_or_init(|| Lifeline { reader, _writer: writer });
    Ok(lifeline.reader.as_raw_fd())
}

/// Makes `command` run under a supervisor that ends its process group when
/// this process ends; `command` must be spawned with `process_group(0)`.
pub(crate) fn attach(command: &mut Command, lifeline: RawFd, kill_grace: Duration) {
    let grace_polls = i32::try_from(kill_grace.as_millis() / u128::from(POLL_MS.unsigned_abs())).unwrap_or(i32::MAX);
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (see `split`); it captures two
    // integers and allocates nothing.
    unsafe {
        command.pre_exec(move || split(lifeline, grace_polls));
    }
}

/// In the forked child: forks the program off and becomes its supervisor.
/// Returns only in the program's process, which then executes the program.
fn split(lifeline: RawFd, grace_polls: i32) -> io::Result<()> {
    // SAFETY: plain system calls on values owned by this stack frame; this
    // process has a single thread (it was just forked).
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        // Blocked before the fork, so the supervisor never runs a signal
        // handler it inherited from the agent's runtime.
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        let supervisor = libc::getpid();
        match fork_plain() {
            -1 => {
                let err = io::Error::last_os_error();
                libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
                Err(err)
            }
            0 => {
                #[cfg(target_os = "linux")]
                {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    if libc::getppid() != supervisor {
                        libc::_exit(127);
                    }
                }
                #[cfg(not(target_os = "linux"))]
                let _ = supervisor;
                libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
                Ok(())
            }
            program => supervise(program, lifeline, grace_polls),
        }
    }
}

/// fork(2) without the C library's fork handlers on Linux: this process is
/// the child of a multi-threaded one, and a handler there could wait for a
/// lock that a thread which no longer exists was holding. Either process
/// only makes plain system calls until the child executes the program.
///
/// # Safety
/// As fork(2): the caller is single-threaded and async-signal-safe.
unsafe fn fork_plain() -> libc::pid_t {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: clone(2) with only the exit signal and no new stack is
        // fork(2); the other arguments are unused when zero on every
        // architecture's argument order.
        let pid = unsafe { libc::syscall(libc::SYS_clone, libc::c_long::from(libc::SIGCHLD), 0, 0, 0, 0) };
        libc::pid_t::try_from(pid).unwrap_or(-1)
    }
    #[cfg(not(target_os = "linux"))]
    // SAFETY: as the caller's.
    unsafe {
        libc::fork()
    }
}

/// The supervisor's life: exits with the program's status, or ends the
/// group once the agent is gone. Only async-signal-safe calls from here on.
fn supervise(program: libc::pid_t, lifeline: RawFd, grace_polls: i32) -> ! {
    keep_only_lifeline(lifeline);
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"muster-sup".as_ptr());
    }
    let pidfd = open_pidfd(program);
    loop {
        if let Some(status) = reap(program) {
            exit_like(status);
        }
        let mut fds = [
            libc::pollfd { fd: LIFELINE_FD, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: pidfd.unwrap_or(-1), events: libc::POLLIN, revents: 0 },
        ];
        let timeout = if pidfd.is_some() { -1 } else { POLL_MS };
        // SAFETY: `fds` is a valid array of two pollfd (poll ignores the
        // negative descriptor of a missing pidfd).
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        let [agent, _] = fds;
        // Nothing is ever written to the lifeline: readiness means the
        // agent's end closed.
        if ready > 0 && agent.revents != 0 {
            break;
        }
    }
    // The agent is gone: nobody will report this attempt, and the task will
    // run again elsewhere. End the whole group, gently first.
    // SAFETY: kill(2) with pid 0 signals this process's group; the
    // supervisor blocks SIGTERM, so only the others receive it.
    unsafe {
        libc::kill(0, libc::SIGTERM);
    }
    for _ in 0..grace_polls {
        if reap(program).is_some() {
            break;
        }
        pause(POLL_MS);
    }
    // SAFETY: as above; SIGKILL cannot be blocked, so this ends the
    // supervisor too.
    unsafe {
        libc::kill(0, libc::SIGKILL);
        libc::_exit(137)
    }
}

/// Points stdin, stdout and stderr at /dev/null (so the output pipes end
/// when the program's copies do), moves the lifeline to [`LIFELINE_FD`] and
/// closes everything else, among it the spawning machinery's error pipe
/// (which the agent reads until every copy is closed) and the descriptors of
/// other commands.
fn keep_only_lifeline(lifeline: RawFd) {
    // SAFETY: open, dup2 and close on descriptor numbers; no memory is
    // shared with anything else.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        for fd in 0..=2 {
            if null >= 0 {
                libc::dup2(null, fd);
            } else {
                libc::close(fd);
            }
        }
        if lifeline != LIFELINE_FD {
            libc::dup2(lifeline, LIFELINE_FD);
        }
        close_from(LIFELINE_FD + 1);
    }
}

/// Closes every descriptor from `first` up.
///
/// # Safety
/// The caller owns no descriptor at or above `first` that it still needs.
unsafe fn close_from(first: RawFd) {
    #[cfg(target_os = "linux")]
    // SAFETY: close_range(2) takes plain integers.
    unsafe {
        let first = first.unsigned_abs();
        if libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) == 0 {
            return;
        }
    }
    // SAFETY: getrlimit writes into the struct on this stack frame; close
    // takes plain integers.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        let last = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            libc::c_int::try_from(limit.rlim_cur).unwrap_or(MAX_CLOSE_LOOP).min(MAX_CLOSE_LOOP)
        } else {
            MAX_CLOSE_LOOP
        };
        for fd in first..last {
            libc::close(fd);
        }
    }
}

/// A descriptor that becomes readable when `program` exits, where the
/// kernel has them (Linux 5.3 and later).
fn open_pidfd(program: libc::pid_t) -> Option<RawFd> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: pidfd_open(2) takes plain integers.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, program, 0) };
        RawFd::try_from(fd).ok().filter(|fd| *fd >= 0)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = program;
        None
    }
}

/// The program's wait status once it has exited, without waiting for it.
/// A program that cannot be waited for (it was already reaped) counts as
/// exited with code 1.
fn reap(program: libc::pid_t) -> Option<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into this stack frame.
        let rc = unsafe { libc::waitpid(program, &mut status, libc::WNOHANG) };
        if rc == program {
            return Some(status);
        }
        if rc == 0 {
            return None;
        }
        // Signals are blocked, but a stop and continue can still interrupt.
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Some(EXITED_WITH_1);
        }
    }
}

/// The wait status of a process that exited with code 1.
const EXITED_WITH_1: libc::c_int = 1 << 8;

/// Exits as the program did: its exit code, or `128 + n` for signal `n`.
fn exit_like(status: libc::c_int) -> ! {
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    };
    // SAFETY: _exit takes a plain integer and skips every atexit handler
    // (which belong to the agent, not to this copy of it).
    unsafe { libc::_exit(code) }
}

fn pause(millis: i32) {
    let request = libc::timespec { tv_sec: 0, tv_nsec: libc::c_long::from(millis) * 1_000_000 };
    // SAFETY: nanosleep reads `request`; the remainder pointer may be null.
    unsafe {
        libc::nanosleep(&request, std::ptr::null_mut());
    }
}
