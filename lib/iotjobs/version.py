# Version comparison for updates (firmware images and application bundles); loaded only by
# the update handlers.


def newer(a, b):
    """True when version a is newer than b (dot-separated numbers; other text compares as 0)."""
    def parts(v):
        out = []
        for p in v.split("."):
            n = 0
            for c in p:
                if "0" <= c <= "9":
                    n = n * 10 + ord(c) - 48
                else:
                    break
            out.append(n)
        return out

    pa, pb = parts(a), parts(b)
    while len(pa) < len(pb):
        pa.append(0)
    while len(pb) < len(pa):
        pb.append(0)
    return pa > pb
