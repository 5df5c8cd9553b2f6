//! Expiry like a replica: every deadline ferry writes to the target is the
//! source's deadline plus a grace (`[apply] expire-grace`).
//!
//! In: the source's commands as they come down the replication stream, and
//! the key headers of a snapshot's RDB. Out: the same, with each expiry
//! deadline later by the grace. Pure logic, unit-tested here; called once
//! per command by the batch builder ([`super::batch`]) and once per key by
//! the snapshot load ([`super::snapshot`]).
//!
//! # Why
//!
//! A Redis replica never expires a key on its own: it waits for the `DEL`
//! (or `UNLINK`) its master propagates when the master expires the key,
//! lazily on access or in its active expiry cycle. ferry's target is a
//! master, so it does expire keys on its own clock, and under lag (a stopped
//! sync, an outage, a slow target, or only a target clock ahead of the
//! source's) a source `EXPIRE`/`PERSIST` that refreshed a key shortly before
//! its deadline arrives after the target dropped the key: the refresh then
//! finds nothing and the key is lost on the target for good. With the
//! deadline pushed back by the grace, the key leaves the target by the
//! source's own `DEL`, which the stream carries like any write; the
//! target's own expiry is only a late backstop for a `DEL` that does not
//! come within the grace. `"0s"` writes the source's deadlines unchanged.
//!
//! # What Redis 7.0 propagates (tests/expire.rs pins it to a live server)
//!
//! A 7.0 master rewrites every relative time to an absolute one before it
//! propagates: `SET … EX/PX/EXAT/PXAT`, `SETEX` and `PSETEX` become `SET key
//! value PXAT ms` (`NX`/`XX`/`GET` dropped, `KEEPTTL` kept); `EXPIRE`,
//! `PEXPIRE`, `EXPIREAT` and `GETEX … EX/PX/EXAT/PXAT` become `PEXPIREAT key
//! ms`, keeping an `NX`/`XX`/`GT`/`LT` flag; `GETEX … PERSIST` becomes
//! `PERSIST`; `RESTORE key ttl …` becomes `RESTORE key ms … ABSTTL`; a
//! `PEXPIREAT` typed by a client goes as typed. A time already in the past
//! makes `EXPIRE`-like commands propagate `DEL`/`UNLINK` instead, while
//! `SET … PXAT <past>` and `RESTORE … ABSTTL` go as they are (the master
//! propagates the `DEL` when it expires the key). An `EXPIRE` that changed
//! nothing (its flag refused it) is not propagated at all, even inside
//! `MULTI`. Scripts and functions propagate their effects, wrapped in
//! `MULTI`/`EXEC`, each effect in the forms above. `COPY`, `RENAME`, `MOVE`
//! carry the TTL the key has on the target, which already has the grace.
//!
//! # The rules
//!
//! | form | rewritten |
//! |---|---|
//! | `SET k v … PXAT ms` / `EXAT s` | `ms + grace` / `s + ⌈grace⌉ s` |
//! | `PEXPIREAT k ms [flag]` / `EXPIREAT k s [flag]` | the time as above; the `NX`/`XX`/`GT`/`LT` flag dropped |
//! | `GETEX k PXAT ms` / `EXAT s` | the time as above |
//! | `RESTORE`/`RESTORE-ASKING k ms … ABSTTL` | `ms + grace` (`0`, no TTL, unchanged) |
//! | relative forms: `SET … EX/PX`, `SETEX`, `PSETEX`, `EXPIRE`, `PEXPIRE`, `GETEX … EX/PX`, `RESTORE` without `ABSTTL` | `n + grace` (in the command's unit), still relative |
//! | anything else (`PERSIST`, `KEEPTTL`, `DEL`, …) | unchanged |
//!
//! The flag is dropped because the source propagates an expire only when it
//! took effect, so on the target it must take effect too; comparing the
//! new deadline with the target's own would only agree with the source's
//! decision if every deadline on the target carried the same grace, which
//! is not so for keys written before a change of `expire-grace`.
//!
//! Relative forms never come from 7.0; an older source (6.x propagates
//! `EXPIRE`/`SETEX` as typed) may send them. They stay relative: the target
//! counts from when it applies them, never earlier than the source did, so
//! its deadline is at least the source's plus the grace. A relative time of
//! zero or less (the source deletes the key at once) is left alone.
//!
//! A time argument that is not an integer as Redis reads one (optional `-`,
//! digits, no leading zero, no `+`) is passed through unchanged: the target
//! refuses it as the source would have. No arithmetic overflows: a deadline
//! that would pass the largest value the target accepts for its form is
//! capped there (`i64::MAX` ms for absolute milliseconds, `i64::MAX / 1000`
//! for absolute seconds, and for relative times that bound less 2^43 ms
//! for the target's clock), and one already beyond it is left as it is.
//!
//! Hash field TTLs (Redis 7.4+, `HPEXPIREAT`, and inside `RESTORE` payloads)
//! are carried as the source gives them, without the grace.

use std::time::Duration;

use bytes::Bytes;

use crate::redis::command::Command;
use crate::redis::rdb::RdbEvent;

/// Default `[apply] expire-grace` and `ferry verify --expire-grace`: five
/// minutes. It covers the lag ferry rides through on its own (reconnect
/// backoff of up to 10 s, a restart of ferry or of the target, a link flap)
/// and any clock skew between the source's and the target's hosts, while
/// keeping what it costs small: `TTL`/`PTTL` read on the target are longer
/// by the grace, and a key whose `DEL` does not come (the sync stopped)
/// stays readable on the target up to the grace after its deadline.
pub const DEFAULT_EXPIRE_GRACE: Duration = Duration::from_secs(300);

/// The largest grace `[apply] expire-grace` accepts.
pub const MAX_EXPIRE_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Room left for the target's clock when a relative time is made longer.
const CLOCK_ROOM_MS: i64 = 1 << 43;

/// What a time argument means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimeForm {
    /// Unix time in milliseconds.
    AbsoluteMs,
    /// Unix time in seconds.
    AbsoluteS,
    /// Milliseconds from when the target runs the command.
    RelativeMs,
    /// Seconds from when the target runs the command.
    RelativeS,
}

impl TimeForm {
    /// The largest value of this form the target accepts (see the module
    /// doc).
    fn bound(self) -> i64 {
        match self {
            TimeForm::AbsoluteMs => i64::MAX,
            TimeForm::AbsoluteS => i64::MAX / 1000,
            TimeForm::RelativeMs => i64::MAX - CLOCK_ROOM_MS,
            TimeForm::RelativeS => (i64::MAX - CLOCK_ROOM_MS) / 1000,
        }
    }

    fn relative(self) -> bool {
        matches!(self, TimeForm::RelativeMs | TimeForm::RelativeS)
    }

    /// The form a `SET`/`GETEX` option names, if it names one.
    fn of_option(option: &[u8]) -> Option<TimeForm> {
        let upper = option.to_ascii_uppercase();
        match upper.as_slice() {
            b"EX" => Some(TimeForm::RelativeS),
            b"PX" => Some(TimeForm::RelativeMs),
            b"EXAT" => Some(TimeForm::AbsoluteS),
            b"PXAT" => Some(TimeForm::AbsoluteMs),
            _ => None,
        }
    }
}

/// Reads an integer the way Redis' `string2ll` does: an optional `-`, then
/// digits without a leading zero (`0` alone is fine), no `+`, no spaces,
/// within `i64`.
fn parse_redis_int(arg: &[u8]) -> Option<i64> {
    let digits = arg.strip_prefix(b"-").unwrap_or(arg);
    let canonical = match digits {
        [] => false,
        [b'0'] => arg.len() == 1,
        [first, rest @ ..] => (b'1'..=b'9').contains(first) && rest.iter().all(u8::is_ascii_digit),
    };
    if !canonical {
        return None;
    }
    std::str::from_utf8(arg).ok()?.parse().ok()
}

/// The grace ferry adds to every deadline it writes to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExpireGrace {
    ms: i64,
}

impl ExpireGrace {
    /// A grace of `grace`, in whole milliseconds (capped at
    /// [`MAX_EXPIRE_GRACE`], which config validation enforces anyway).
    pub fn new(grace: Duration) -> ExpireGrace {
        let ms = grace.min(MAX_EXPIRE_GRACE).as_millis();
        ExpireGrace {
            ms: i64::try_from(ms).unwrap_or(i64::MAX),
        }
    }

    /// The grace in milliseconds.
    pub fn as_millis(self) -> i64 {
        self.ms
    }

    /// The grace in the unit of `form`, rounded up for seconds.
    fn in_unit(self, form: TimeForm) -> i64 {
        match form {
            TimeForm::AbsoluteMs | TimeForm::RelativeMs => self.ms,
            TimeForm::AbsoluteS | TimeForm::RelativeS => (self.ms + 999) / 1000,
        }
    }

    /// An absolute deadline in unix milliseconds (an RDB key's expiry),
    /// later by the grace; saturates at `i64::MAX`.
    pub fn deadline_ms(self, at_ms: i64) -> i64 {
        at_ms.saturating_add(self.ms)
    }

    /// Moves the deadline of a snapshot key (`RdbEvent::KeyStart`) by the
    /// grace; other events are left alone. A key whose deadline passed less
    /// than the grace ago is then loaded (the source will `DEL` it), one
    /// past longer than that is skipped by the rebuilder as before.
    pub fn shift_key_start(self, event: &mut RdbEvent) {
        if let RdbEvent::KeyStart(header) = event {
            header.expire_ms = header.expire_ms.map(|at| self.deadline_ms(at));
        }
    }

    /// `value` later by the grace, as the bytes of the new argument; `None`
    /// when it stays as it is (malformed, no grace, a relative time that
    /// deletes at once, or already beyond the form's bound).
    fn later(self, value: &[u8], form: TimeForm) -> Option<Bytes> {
        let add = self.in_unit(form);
        if add == 0 {
            return None;
        }
        let original = parse_redis_int(value)?;
        if form.relative() && original <= 0 {
            return None;
        }
        let bound = form.bound();
        if original >= bound {
            return None;
        }
        let moved = original.saturating_add(add).min(bound);
        Some(Bytes::from(moved.to_string()))
    }

    /// Rewrites `args[index]` (a time of `form`) in place; true when it did.
    fn rewrite_at(self, args: &mut [Bytes], index: usize, form: TimeForm) -> bool {
        let Some(value) = args.get(index) else {
            return false;
        };
        match self.later(value, form) {
            Some(moved) => {
                args[index] = moved;
                true
            }
            None => false,
        }
    }

    /// Rewrites the time of every `EX`/`PX`/`EXAT`/`PXAT` option of a
    /// `SET` (options from index 3) or a `GETEX` (from index 2).
    fn rewrite_options(self, args: &mut [Bytes], first_option: usize) {
        let mut index = first_option;
        while index < args.len() {
            match TimeForm::of_option(&args[index]) {
                Some(form) => {
                    self.rewrite_at(args, index + 1, form);
                    index += 2;
                }
                None => index += 1,
            }
        }
    }

    /// `RESTORE key ttl payload [REPLACE] [ABSTTL] [IDLETIME s] [FREQ f]`:
    /// whether `ABSTTL` is among the options.
    fn restore_abs_ttl(args: &[Bytes]) -> bool {
        let mut index = 4;
        while index < args.len() {
            let option = args[index].to_ascii_uppercase();
            match option.as_slice() {
                b"ABSTTL" => return true,
                b"IDLETIME" | b"FREQ" => index += 2,
                _ => index += 1,
            }
        }
        false
    }

    /// The command with its deadline later by the grace (see the module
    /// doc for every form); any other command, and every command when the
    /// grace is zero, comes back unchanged.
    pub fn rewrite(self, mut cmd: Command) -> Command {
        if self.ms == 0 || cmd.args.len() < 3 {
            return cmd;
        }
        // Every name below fits: a longer one is none of them. Uppercased
        // on the stack, as this runs for every replicated command.
        let mut upper = [0u8; 16];
        let Some(name) = upper.get_mut(..cmd.name().len()) else {
            return cmd;
        };
        name.copy_from_slice(cmd.name());
        name.make_ascii_uppercase();
        let name: &[u8] = name;
        let args = &mut cmd.args;
        match name {
            b"SET" => self.rewrite_options(args, 3),
            b"GETEX" => self.rewrite_options(args, 2),
            b"SETEX" => {
                self.rewrite_at(args, 2, TimeForm::RelativeS);
            }
            b"PSETEX" => {
                self.rewrite_at(args, 2, TimeForm::RelativeMs);
            }
            b"EXPIRE" | b"PEXPIRE" | b"EXPIREAT" | b"PEXPIREAT" => {
                let form = match name {
                    b"EXPIRE" => TimeForm::RelativeS,
                    b"PEXPIRE" => TimeForm::RelativeMs,
                    b"EXPIREAT" => TimeForm::AbsoluteS,
                    _ => TimeForm::AbsoluteMs,
                };
                let flags_only = args[3..].iter().all(|flag| {
                    matches!(
                        flag.to_ascii_uppercase().as_slice(),
                        b"NX" | b"XX" | b"GT" | b"LT"
                    )
                });
                if self.rewrite_at(args, 2, form) && flags_only {
                    args.truncate(3);
                }
            }
            // A TTL of 0 means none.
            b"RESTORE" | b"RESTORE-ASKING"
                if parse_redis_int(&args[2]).is_some_and(|ttl| ttl > 0) =>
            {
                let form = if Self::restore_abs_ttl(args) {
                    TimeForm::AbsoluteMs
                } else {
                    TimeForm::RelativeMs
                };
                self.rewrite_at(args, 2, form);
            }
            _ => {}
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::rdb::{KeyHeader, ValueType};

    const GRACE: ExpireGrace = ExpireGrace { ms: 300_000 };

    fn rewritten(grace: ExpireGrace, parts: &[&str]) -> String {
        grace
            .rewrite(Command::from_parts(parts))
            .args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn check(parts: &[&str], expected: &str) {
        assert_eq!(rewritten(GRACE, parts), expected, "{parts:?}");
    }

    #[test]
    fn what_redis_7_0_propagates_gets_the_grace() {
        check(
            &["SET", "k", "v", "PXAT", "1796522183801"],
            "SET k v PXAT 1796522483801",
        );
        check(
            &["PEXPIREAT", "k", "1796522183801"],
            "PEXPIREAT k 1796522483801",
        );
        // As a client typed it: any case.
        check(
            &["pexpireat", "k", "1796522183801"],
            "pexpireat k 1796522483801",
        );
        check(
            &["RESTORE", "k", "1796522105291", "payload", "ABSTTL"],
            "RESTORE k 1796522405291 payload ABSTTL",
        );
        check(
            &[
                "RESTORE",
                "k",
                "1796522106291",
                "payload",
                "REPLACE",
                "IDLETIME",
                "10",
                "ABSTTL",
            ],
            "RESTORE k 1796522406291 payload REPLACE IDLETIME 10 ABSTTL",
        );
        check(
            &[
                "RESTORE-ASKING",
                "k",
                "1000",
                "payload",
                "FREQ",
                "5",
                "ABSTTL",
            ],
            "RESTORE-ASKING k 301000 payload FREQ 5 ABSTTL",
        );
        // A past deadline (7.0 propagates SET … PXAT <past> as is).
        check(&["SET", "m", "1", "PXAT", "1000"], "SET m 1 PXAT 301000");
    }

    #[test]
    fn expire_flags_are_dropped_with_the_new_time() {
        for flag in ["NX", "XX", "GT", "lt"] {
            check(&["PEXPIREAT", "k", "1000", flag], "PEXPIREAT k 301000");
        }
        // Not only flags: left as it is (the target refuses it as the
        // source would have).
        check(
            &["PEXPIREAT", "k", "1000", "GT", "bogus"],
            "PEXPIREAT k 301000 GT bogus",
        );
        // No new time, no change at all.
        check(&["PEXPIREAT", "k", "x", "GT"], "PEXPIREAT k x GT");
    }

    #[test]
    fn relative_forms_of_older_sources_stay_relative() {
        check(&["SET", "k", "v", "EX", "10"], "SET k v EX 310");
        check(&["SET", "k", "v", "px", "10"], "SET k v px 300010");
        check(
            &["SET", "k", "v", "NX", "GET", "EX", "10"],
            "SET k v NX GET EX 310",
        );
        check(&["SETEX", "k", "10", "v"], "SETEX k 310 v");
        check(&["PSETEX", "k", "10", "v"], "PSETEX k 300010 v");
        check(&["EXPIRE", "k", "10"], "EXPIRE k 310");
        check(&["PEXPIRE", "k", "10", "XX"], "PEXPIRE k 300010");
        check(&["EXPIREAT", "k", "1700000000"], "EXPIREAT k 1700000300");
        check(&["GETEX", "k", "EX", "10"], "GETEX k EX 310");
        check(&["GETEX", "k", "PX", "10"], "GETEX k PX 300010");
        check(&["GETEX", "k", "EXAT", "10"], "GETEX k EXAT 310");
        check(&["GETEX", "k", "PXAT", "10"], "GETEX k PXAT 300010");
        check(&["SET", "k", "v", "EXAT", "10"], "SET k v EXAT 310");
        check(
            &["RESTORE", "k", "5000", "payload"],
            "RESTORE k 305000 payload",
        );
        // Zero or less: the source deletes at once; so does the target.
        check(&["EXPIRE", "k", "0"], "EXPIRE k 0");
        check(&["PEXPIRE", "k", "-5"], "PEXPIRE k -5");
        check(&["SET", "k", "v", "EX", "0"], "SET k v EX 0");
    }

    #[test]
    fn seconds_get_the_grace_rounded_up() {
        let grace = ExpireGrace::new(Duration::from_millis(1500));
        assert_eq!(
            rewritten(grace, &["EXPIREAT", "k", "100"]),
            "EXPIREAT k 102"
        );
        assert_eq!(
            rewritten(grace, &["PEXPIREAT", "k", "100"]),
            "PEXPIREAT k 1600"
        );
        let small = ExpireGrace::new(Duration::from_millis(1));
        assert_eq!(rewritten(small, &["EXPIRE", "k", "100"]), "EXPIRE k 101");
    }

    #[test]
    fn what_carries_no_deadline_is_unchanged() {
        for parts in [
            &["SET", "k", "v"][..],
            &["SET", "k", "v", "KEEPTTL"],
            &["SET", "k", "EX", "v"],
            &["PERSIST", "k"],
            &["GETEX", "k"],
            &["GETEX", "k", "PERSIST"],
            &["DEL", "k"],
            &["UNLINK", "k"],
            &["COPY", "a", "b"],
            &["RESTORE", "k", "0", "payload", "REPLACE"],
            &["HSET", "EX", "PX", "10"],
            &["MULTI"],
            &[],
        ] {
            assert_eq!(
                rewritten(GRACE, parts),
                parts.join(" "),
                "{parts:?} changed"
            );
        }
    }

    #[test]
    fn malformed_times_pass_through() {
        for parts in [
            &["SET", "k", "v", "PXAT", "soon"][..],
            &["SET", "k", "v", "PXAT"],
            &["SET", "k", "v", "PXAT", "+1000"],
            &["SET", "k", "v", "PXAT", "01000"],
            &["SET", "k", "v", "PXAT", " 1000"],
            &["SET", "k", "v", "PXAT", "1000.5"],
            &["SET", "k", "v", "PXAT", "-0"],
            &["SET", "k", "v", "PXAT", ""],
            &["SET", "k", "v", "PXAT", "99999999999999999999"],
            &["PEXPIREAT", "k", "1e3"],
            &["PEXPIREAT", "k"],
            &["RESTORE", "k", "-1", "payload", "ABSTTL"],
            &["RESTORE", "k", "ttl", "payload"],
            &["SETEX", "k", "\u{ff}", "v"],
        ] {
            assert_eq!(
                rewritten(GRACE, parts),
                parts.join(" "),
                "{parts:?} changed"
            );
        }
        assert_eq!(parse_redis_int(b"0"), Some(0));
        assert_eq!(parse_redis_int(b"-12"), Some(-12));
        assert_eq!(parse_redis_int(b"-"), None);
        assert_eq!(parse_redis_int(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_redis_int(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_redis_int(b"9223372036854775808"), None);
    }

    #[test]
    fn deadlines_stop_at_what_the_target_accepts() {
        let max = i64::MAX.to_string();
        // Absolute ms: capped at i64::MAX, which PEXPIREAT accepts.
        check(&["PEXPIREAT", "k", &max], &format!("PEXPIREAT k {max}"));
        let near = (i64::MAX - 10).to_string();
        check(&["PEXPIREAT", "k", &near], &format!("PEXPIREAT k {max}"));
        check(
            &["RESTORE", "k", &near, "p", "ABSTTL"],
            &format!("RESTORE k {max} p ABSTTL"),
        );
        // Absolute seconds: EXPIREAT refuses more than i64::MAX / 1000.
        let s_bound = (i64::MAX / 1000).to_string();
        let s_near = (i64::MAX / 1000 - 10).to_string();
        check(
            &["EXPIREAT", "k", &s_near],
            &format!("EXPIREAT k {s_bound}"),
        );
        check(
            &["SET", "k", "v", "EXAT", &s_near],
            &format!("SET k v EXAT {s_bound}"),
        );
        // Already beyond a bound: left alone (the target decides).
        let beyond = (i64::MAX / 1000 + 1).to_string();
        check(&["EXPIREAT", "k", &beyond], &format!("EXPIREAT k {beyond}"));
        // Relative: room is left for the target's clock.
        let rel = TimeForm::RelativeMs.bound().to_string();
        check(&["PEXPIRE", "k", &near], &format!("PEXPIRE k {near}"));
        let rel_near = (TimeForm::RelativeMs.bound() - 10).to_string();
        check(&["PEXPIRE", "k", &rel_near], &format!("PEXPIRE k {rel}"));
        let rel_s = TimeForm::RelativeS.bound().to_string();
        let rel_s_near = (TimeForm::RelativeS.bound() - 10).to_string();
        check(
            &["SETEX", "k", &rel_s_near, "v"],
            &format!("SETEX k {rel_s} v"),
        );
        // Deadlines from an RDB saturate.
        assert_eq!(GRACE.deadline_ms(i64::MAX - 1), i64::MAX);
        assert_eq!(GRACE.deadline_ms(1000), 301_000);
        assert_eq!(GRACE.deadline_ms(i64::MIN), i64::MIN + 300_000);
    }

    #[test]
    fn zero_grace_changes_nothing() {
        let none = ExpireGrace::new(Duration::ZERO);
        assert_eq!(none, ExpireGrace::default());
        for parts in [
            &["SET", "k", "v", "PXAT", "1000"][..],
            &["PEXPIREAT", "k", "1000", "GT"],
            &["RESTORE", "k", "1000", "p", "ABSTTL"],
            &["EXPIRE", "k", "10"],
        ] {
            assert_eq!(rewritten(none, parts), parts.join(" "));
        }
        assert_eq!(none.deadline_ms(1000), 1000);
        // Sub-millisecond graces are none; huge ones are capped.
        assert_eq!(ExpireGrace::new(Duration::from_micros(999)).as_millis(), 0);
        assert_eq!(
            ExpireGrace::new(Duration::from_secs(u64::MAX)).as_millis(),
            MAX_EXPIRE_GRACE.as_millis() as i64
        );
    }

    #[test]
    fn snapshot_keys_get_the_grace() {
        let header = |expire_ms| KeyHeader {
            db: 0,
            key: Bytes::from_static(b"k"),
            value_type: ValueType::String,
            encoding: 0,
            expire_ms,
            lru_idle: None,
            lfu_freq: None,
        };
        let mut event = RdbEvent::KeyStart(header(Some(1000)));
        GRACE.shift_key_start(&mut event);
        assert_eq!(event, RdbEvent::KeyStart(header(Some(301_000))));
        let mut event = RdbEvent::KeyStart(header(None));
        GRACE.shift_key_start(&mut event);
        assert_eq!(event, RdbEvent::KeyStart(header(None)));
    }
}
