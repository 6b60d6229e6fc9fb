"""Engine processes in a process group of their own, and signals to that group: PythonSlicer is CTK's
launcher, which starts the Python that does the work as its child, so a signal to the launcher alone
would leave that child running."""

import os
import signal
import subprocess


def processGroupOptions():
    """Popen options that give the process a group of its own, so that a signal to the group also
    reaches the Python child that the PythonSlicer launcher starts."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def signalProcessTree(process, hard):
    """SIGTERM (or SIGKILL when `hard`) to the group of a process started with processGroupOptions()."""
    if os.name == "nt":
        # Windows has no SIGTERM for a console process group: end the whole tree at once.
        if process.poll() is None:
            # Slicer is a windowed program: without CREATE_NO_WINDOW each call flashes a console.
            subprocess.run(
                ["taskkill", "/F", "/T", "/PID", str(process.pid)],
                capture_output=True,
                creationflags=subprocess.CREATE_NO_WINDOW,
            )
        return
    try:
        os.killpg(process.pid, signal.SIGKILL if hard else signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass  # the group has already exited
