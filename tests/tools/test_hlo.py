"""`mhc_jax.tools.hlo.collective_stats` on hand-written HLO: loop trip counts, async ops, channels."""
from mhc_jax.tools.hlo import array_bytes, collective_stats

HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), channel_id=2, to_apply=%add
  %ag = (f32[8]{0}, f32[64]{0}) all-gather-start(f32[8]{0} %x), channel_id=3, dimensions={0}
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while((s32[], f32[8]) %t), condition=%cond, body=%body TRIP
  %rs = f32[2]{0} reduce-scatter(f32[8]{0} %x), channel_id=4, dimensions={0}, to_apply=%add
  %rs2 = f32[2]{0} reduce-scatter(f32[8]{0} %x), channel_id=4, dimensions={0}, to_apply=%add
}
"""


def _check(stats, trips):
  assert stats["all-reduce"] == {"count": trips, "bytes": trips * 8 * 4}
  # async all-gather: (operand, result) tuple; the result (64 floats) is what moves
  assert stats["all-gather"] == {"count": trips, "bytes": trips * 64 * 4}
  assert stats["reduce-scatter"] == {"count": 1, "bytes": 2 * 4}   # one channel counted once
  assert stats["all-to-all"]["count"] == stats["collective-permute"]["count"] == 0


def test_known_trip_count_multiplies_the_loop_body():
  hlo = HLO.replace(" TRIP", ', backend_config={"known_trip_count":{"n":"5"}}')
  _check(collective_stats(hlo), 5)


def test_trip_count_from_the_loop_condition():
  _check(collective_stats(HLO.replace(" TRIP", "")), 7)


def test_array_bytes_and_no_entry():
  assert array_bytes("(f32[4,8]{1,0}, bf16[2], pred[])") == [128, 4, 1]
  assert collective_stats("not hlo")["all-reduce"] == {"count": 0, "bytes": 0}
