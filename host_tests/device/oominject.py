# Deterministic out-of-memory injection for MicroPython tests, in the spirit of the power-cut
# simulation (flashsim): every function and method of the chosen modules and classes becomes a
# "seam" that counts its calls; at the N-th call since `arm(N)` the heap is locked
# (micropython.heap_lock) for the duration of that one call, so the first allocation anywhere
# inside it raises a real MemoryError from the allocator, wherever that allocation is (a topic,
# a JSON document, a journal write, a log line, a dict in the runner...). Sweeping N over a job's
# life hits every call of the device code once.
import micropython


def _is_function(v):
    t = type(v).__name__
    return t == "function" or t == "closure" or t == "generator"


def _call(fn, a, kw):
    """fn(*a, **kw) without the heap allocation a star call makes (up to 7 positional
    arguments): under a locked heap the call itself must not be what fails."""
    if kw:
        return fn(*a, **kw)
    n = len(a)
    if n == 0:
        return fn()
    if n == 1:
        return fn(a[0])
    if n == 2:
        return fn(a[0], a[1])
    if n == 3:
        return fn(a[0], a[1], a[2])
    if n == 4:
        return fn(a[0], a[1], a[2], a[3])
    if n == 5:
        return fn(a[0], a[1], a[2], a[3], a[4])
    if n == 6:
        return fn(a[0], a[1], a[2], a[3], a[4], a[5])
    if n == 7:
        return fn(a[0], a[1], a[2], a[3], a[4], a[5], a[6])
    return fn(*a)


class Injector:
    def __init__(self):
        self.calls = 0  # seam calls since arm()
        self.at = 0  # the call that faults (0: none)
        self.fired = None  # the seam that was locked, once it has been
        self.locked = False
        self.seams = []  # (owner, name, original, seam, is_item)

    @property
    def patched(self):
        return len(self.seams)

    def arm(self, at):
        self.calls = 0
        self.at = at
        self.fired = None

    def _swap(self, k):
        # k=2: the originals, k=3: the seams. Storing into an existing attribute allocates
        # nothing, so the calls made under the locked heap run the code as it is, without the
        # seams' argument tuples.
        for e in self.seams:
            if e[4]:
                e[0][e[1]] = e[k]
            else:
                setattr(e[0], e[1], e[k])

    def wrap(self, name, fn):
        inj = self

        def seam(*args, **kw):
            inj.calls += 1
            if inj.calls != inj.at or inj.locked:
                return fn(*args, **kw)
            inj.fired = name
            inj.locked = True
            inj._swap(2)
            micropython.heap_lock()
            try:
                return _call(fn, args, kw)
            finally:
                micropython.heap_unlock()
                inj._swap(3)
                inj.locked = False

        return seam

    def _patch(self, owner, name, label, fn, item=False):
        seam = self.wrap(label, fn)
        if item:
            owner[name] = seam
        else:
            setattr(owner, name, seam)
        self.seams.append((owner, name, fn, seam, item))

    def patch_attr(self, obj, name, label):
        """An attribute holding a callable (a callback, a bound method stored before the
        patching, a logger): a seam that is swapped back like the others."""
        self._patch(obj, name, label, getattr(obj, name))

    def patch_item(self, d, key, label):
        """A callable held in a dict (a handler table)."""
        self._patch(d, key, label, d[key], True)

    def patch_class(self, cls, skip=()):
        """Every function defined in `cls` itself (not inherited, not properties)."""
        for name, v in list(cls.__dict__.items()):
            if name.startswith("__") or name in skip or not _is_function(v):
                continue
            self._patch(cls, name, cls.__name__ + "." + name, v)

    def patch_module(self, mod, skip=()):
        """Every module-level function (calls between them go through the module's globals,
        so they are seams too)."""
        for name in dir(mod):
            if name.startswith("__") or name in skip:
                continue
            v = getattr(mod, name)
            if _is_function(v):
                self._patch(mod, name, mod.__name__ + "." + name, v)
