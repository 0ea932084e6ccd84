"""Writing files so that an interrupted run never leaves a truncated one: write a temporary file, then rename."""
import os
import tempfile


def atomic_write(path, write):
    """Calls `write(binary_file)` on a temporary file beside `path`, then renames it over `path`.

    The rename is atomic on POSIX: readers see the old file or the complete new one, never a partial one.
    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
