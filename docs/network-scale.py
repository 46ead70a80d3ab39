"""Draws docs/network-scale.svg: CPU per node against alliance size, from
the two parts of a node's cost (see docs/network-scale.md): a background
in proportion to its connections, which stay bounded, and a share per
advert refresh taken in, at a rate that stays flat until the advert
lifetime reaches its hour.

    python3 docs/network-scale.py
"""
DEGREE = 11.6         # connections a node held at steady state at 50 nodes (at most 16)
PER_ADVERT = 0.79e-3  # CPU s per node for each advert it takes in (propagation benchmark:
                      # 38.6 ms of CPU per publish over 49 receivers)
MEASURED = [(50, 0.156), (200, 0.218)]
# CPU s per node per minute per connection: what the 50-node measurement
# leaves once the adverts have their share.
PER_CONNECTION = (MEASURED[0][1] - 50 / 30 * PER_ADVERT * 60) / DEGREE
# What grew from 50 to 200 nodes that neither part explains, per extra
# node, carried on in a straight line: the pessimistic curve.
GROWTH = (MEASURED[1][1] - MEASURED[0][1]) / (MEASURED[1][0] - MEASURED[0][0])
BASE_TTL = 120.0      # the charter's advert lifetime, s
MAX_TTL = 3600.0      # the longest an advert may live, s
FULL_RATE = 50        # advertisers below which the lifetime is the charter's

def refreshes(n):
    ttl = min(BASE_TTL * max(1, -(-n // FULL_RATE)), MAX_TTL)
    return n / (ttl / 4)

def cost(n):
    return PER_CONNECTION * DEGREE + refreshes(n) * PER_ADVERT * 60

def cost_linear(n):
    return cost(n) + GROWTH * (n - MEASURED[0][0])

W, H, L, R, T, B = 640, 360, 70, 20, 30, 50
xs = [50, 100, 200, 500, 1000, 2000, 5000]
ymax = cost_linear(1000) * 1.1
XMAX = 5000
def clip(y): return min(y, ymax)
def px(x): return L + (W - L - R) * x / 5000
def py(y): return H - B - (H - T - B) * clip(y) / ymax
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W/2}" y="18" text-anchor="middle" font-size="14">CPU seconds per node per minute against alliance size</text>']
step = 0.25
for k in range(0, int(ymax / step) + 1):
    i = k * step
    out.append(f'<line x1="{L}" x2="{W-R}" y1="{py(i)}" y2="{py(i)}" stroke="#ddd"/>')
    out.append(f'<text x="{L-8}" y="{py(i)+4}" text-anchor="end">{i:g}</text>')
for x in [0, 1000, 2000, 3000, 4000, 5000]:
    out.append(f'<text x="{px(x)}" y="{H-B+18}" text-anchor="middle">{x}</text>')
out.append(f'<text x="{(L+W-R)/2}" y="{H-12}" text-anchor="middle">nodes</text>')
out.append(f'<line x1="{L}" x2="{L}" y1="{T}" y2="{H-B}" stroke="black"/><line x1="{L}" x2="{W-R}" y1="{H-B}" y2="{H-B}" stroke="black"/>')
pts = " ".join(f"{px(x)},{py(cost(x))}" for x in range(50, 5001, 50))
out.append(f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="2" stroke-dasharray="6 4"/>')
lin = " ".join(f"{px(x)},{py(cost_linear(x))}" for x in range(50, 5001, 50) if cost_linear(x) <= ymax)
out.append(f'<polyline points="{lin}" fill="none" stroke="#ff7f0e" stroke-width="2" stroke-dasharray="2 3"/>')
out.append(f'<text x="{px(700)}" y="{py(cost_linear(700))-8}" fill="#ff7f0e">50→200 growth carried on in a straight line</text>')
lim = 1.5 * MEASURED[0][1]
out.append(f'<line x1="{L}" x2="{W-R}" y1="{py(lim)}" y2="{py(lim)}" stroke="#d62728"/>')
out.append(f'<text x="{W-R-4}" y="{py(lim)-4}" text-anchor="end" fill="#d62728">1.5 × the 50-node cost</text>')
for x, y in MEASURED:
    out.append(f'<circle cx="{px(x)}" cy="{py(y)}" r="5" fill="#1f77b4"/>')
    out.append(f'<text x="{px(x)+8}" y="{py(y)+16}">measured, {x}</text>')
out.append(f'<text x="{px(1600)}" y="{py(cost(3000))-10}" fill="#1f77b4">bounded degree + flat refresh rate (lifetime capped at 1 h past 1,500)</text>')
out.append("</svg>")
open("docs/network-scale.svg", "w").write("\n".join(out) + "\n")
for x in xs:
    print(x, round(refreshes(x), 1), round(cost(x), 3), round(cost_linear(x), 3))
