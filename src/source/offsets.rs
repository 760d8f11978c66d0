//! Which offsets may be committed: per partition, the highest offset below which EVERY message
//! is durably done. Pure (no Kafka here), so it is tested exhaustively on its own.
//!
//! A message is done when all its acknowledgements arrived (its ClickHouse row, its dead
//! letter, its escalation: whatever the pipeline asked for). Messages finish out of order;
//! the watermark only moves over a contiguous done prefix. Each assignment of a partition gets
//! a new epoch: acknowledgements from an earlier assignment (a revoked partition's late
//! results) are ignored, so they can never move the new owner's watermark.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        TopicPartition { topic: topic.into(), partition }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Identifies one consumed message for acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Delivery {
    pub tp: TopicPartition,
    pub offset: i64,
    pub epoch: u64,
}

#[derive(Debug, Default)]
struct PartitionState {
    epoch: u64,
    /// offset -> acknowledgements still missing (0 = done, waiting for the prefix).
    pending: BTreeMap<i64, u32>,
    /// offset -> when it was begun (ms), for messages not yet done.
    begun_ms: BTreeMap<i64, u64>,
    /// Done offsets below the watermark, not yet covered by a commit (ascending): with
    /// `pending`, what a crash now would replay.
    settled: std::collections::VecDeque<i64>,
    /// Next offset to commit: everything below it is done.
    watermark: Option<i64>,
    /// The watermark last committed (or the position at assignment).
    committed: Option<i64>,
}

impl PartitionState {
    /// Everything below the first unfinished message is done (or never existed: gaps); with
    /// nothing unfinished, everything consumed is done. Only offered when it moved forward.
    fn uncommitted_point(&self) -> Option<i64> {
        let point = self.pending.first_key_value().map(|(&first, _)| first).or(self.watermark)?;
        self.committed.is_none_or(|c| point > c).then_some(point)
    }
}

/// What revoking a partition leaves behind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// The offset still to commit for it (None: the last commit covers everything done).
    pub commit: Option<i64>,
    /// Messages unfinished here (abandoned: their results are still written, and the next owner
    /// reads them again).
    pub unfinished: usize,
    /// Messages the next owner reads again once `commit` lands: the unfinished ones and those
    /// done behind them.
    pub replayed: usize,
    /// Done and not yet covered by a commit: read again as well if `commit` is refused.
    pub uncommitted_done: usize,
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<TopicPartition, PartitionState>,
    next_epoch: u64,
    /// Unfinished messages of revoked assignments: (partition, epoch, offset) -> acks missing.
    /// Their results are still in the pipeline (a row buffered for ClickHouse, a dead letter
    /// being written): they hold memory until they finish, so they count as in flight, though
    /// they can never move a watermark.
    orphans: HashMap<(TopicPartition, u64), BTreeMap<i64, u32>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckResult {
    /// Counted; the message still waits for others.
    Counted,
    /// The message is now done.
    Done,
    /// From an earlier assignment, an unknown offset, or acknowledged too often: ignored.
    Stale,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The partition is (re)assigned: a new epoch; anything in flight from before is stale.
    pub fn assign(&mut self, tp: TopicPartition) -> u64 {
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        self.partitions.insert(tp, PartitionState { epoch, ..PartitionState::default() });
        epoch
    }

    /// The partition is revoked: what may still be committed for it, and what its next owner
    /// will read again.
    pub fn revoke(&mut self, tp: &TopicPartition) -> Revoked {
        match self.partitions.remove(tp) {
            Some(state) => {
                let commit = state.uncommitted_point();
                // Everything still pending sits at or after `commit`: done ones wait behind an
                // unfinished one.
                let replayed = state.pending.len();
                let uncommitted_done = state.settled.len();
                let unfinished: BTreeMap<i64, u32> = state.pending.into_iter().filter(|&(_, n)| n > 0).collect();
                let count = unfinished.len();
                if count > 0 {
                    self.orphans.insert((tp.clone(), state.epoch), unfinished);
                }
                Revoked { commit, unfinished: count, replayed, uncommitted_done }
            }
            None => Revoked::default(),
        }
    }

    /// A message was consumed and will need `acks` acknowledgements (at least 1).
    /// Returns its delivery handle, or None if the partition is not assigned.
    pub fn begin(&mut self, tp: &TopicPartition, offset: i64, acks: u32) -> Option<Delivery> {
        self.begin_at(tp, offset, acks, crate::time::now_ms())
    }

    /// [`begin`](Self::begin) at a given time (ms), which [`oldest_unfinished`](Self::oldest_unfinished) measures from.
    pub fn begin_at(&mut self, tp: &TopicPartition, offset: i64, acks: u32, now_ms: u64) -> Option<Delivery> {
        let state = self.partitions.get_mut(tp)?;
        state.begun_ms.insert(offset, now_ms);
        if state.watermark.is_none() {
            // We read from the committed position: committing it again would be a no-op.
            state.watermark = Some(offset);
            state.committed = state.committed.or(Some(offset));
        }
        state.pending.insert(offset, acks.max(1));
        Some(Delivery { tp: tp.clone(), offset, epoch: state.epoch })
    }

    /// A message needs `extra` more acknowledgements than announced at `begin` (e.g. it turned
    /// out to need an escalation as well as its row).
    pub fn add_acks(&mut self, d: &Delivery, extra: u32) -> bool {
        match self.partitions.get_mut(&d.tp) {
            Some(s) if s.epoch == d.epoch => match s.pending.get_mut(&d.offset) {
                Some(n) if *n > 0 => {
                    *n += extra;
                    true
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// One acknowledgement for a message.
    pub fn ack(&mut self, d: &Delivery) -> AckResult {
        let current = self.partitions.get(&d.tp).is_some_and(|s| s.epoch == d.epoch);
        if !current {
            self.ack_orphan(d);
            return AckResult::Stale;
        }
        let Some(state) = self.partitions.get_mut(&d.tp) else { return AckResult::Stale };
        let Some(remaining) = state.pending.get_mut(&d.offset) else { return AckResult::Stale };
        if *remaining == 0 {
            return AckResult::Stale;
        }
        *remaining -= 1;
        if *remaining > 0 {
            return AckResult::Counted;
        }
        state.begun_ms.remove(&d.offset);
        // Advance over the done prefix.
        while let Some((&offset, &left)) = state.pending.first_key_value() {
            if left > 0 {
                break;
            }
            state.pending.pop_first();
            state.settled.push_back(offset);
            state.watermark = Some(offset + 1);
        }
        AckResult::Done
    }

    /// A late acknowledgement of a revoked assignment: it frees its place in the in-flight count.
    fn ack_orphan(&mut self, d: &Delivery) {
        let key = (d.tp.clone(), d.epoch);
        if let Some(orphans) = self.orphans.get_mut(&key) {
            if let Some(n) = orphans.get_mut(&d.offset) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    orphans.remove(&d.offset);
                }
            }
            if orphans.is_empty() {
                self.orphans.remove(&key);
            }
        }
    }

    /// For every assigned partition, how long its oldest unfinished message has waited (ms);
    /// None for a partition with nothing unfinished (idle is not stalled).
    pub fn oldest_unfinished(&self, now_ms: u64) -> Vec<(TopicPartition, Option<u64>)> {
        let mut out: Vec<_> = self
            .partitions
            .iter()
            .map(|(tp, s)| {
                // The first pending message is unfinished: a done prefix is popped at once.
                let oldest = s.pending.keys().next().and_then(|o| s.begun_ms.get(o));
                (tp.clone(), oldest.map(|&t| now_ms.saturating_sub(t)))
            })
            .collect();
        out.sort();
        out
    }

    /// Partitions whose watermark moved since the last commit: (partition, next offset).
    pub fn committable(&self) -> Vec<(TopicPartition, i64)> {
        let mut out: Vec<_> = self.partitions.iter().filter_map(|(tp, s)| s.uncommitted_point().map(|w| (tp.clone(), w))).collect();
        out.sort();
        out
    }

    /// Record a successful commit.
    pub fn committed(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(s) = self.partitions.get_mut(tp) {
            s.committed = s.committed.max(Some(offset));
            while s.settled.front().is_some_and(|&o| o < offset) {
                s.settled.pop_front();
            }
        }
    }

    /// Messages consumed and not yet committed, over the assigned partitions (done or not: a
    /// crash now replays them all), plus revoked ones still in the pipeline (memory). What
    /// backpressure bounds, so `max_in_flight` bounds what a SIGKILL replays.
    pub fn uncommitted(&self) -> usize {
        let assigned: usize = self.partitions.values().map(|s| s.pending.len() + s.settled.len()).sum();
        assigned + self.orphans.values().map(BTreeMap::len).sum::<usize>()
    }

    /// Messages consumed but not yet done, over all partitions, revoked ones' included.
    pub fn in_flight(&self) -> usize {
        let assigned: usize = self.partitions.values().map(|s| s.pending.values().filter(|&&n| n > 0).count()).sum();
        assigned + self.orphans.values().map(BTreeMap::len).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn tp() -> TopicPartition {
        TopicPartition::new("tickets", 0)
    }

    #[test]
    fn revoked_messages_still_in_the_pipeline_count_until_their_late_acks() {
        let mut t = OffsetTracker::new();
        t.assign(tp());
        let d: Vec<_> = (0..5).map(|o| t.begin(&tp(), o, 1).unwrap()).collect();
        assert_eq!(t.ack(&d[0]), AckResult::Done);
        let revoked = t.revoke(&tp());
        assert_eq!(revoked, Revoked { commit: Some(1), unfinished: 4, replayed: 4, uncommitted_done: 1 });
        assert_eq!(t.in_flight(), 4, "their rows are still buffered somewhere: memory");
        // Reassigned (a new epoch) while the old results are still on their way.
        t.assign(tp());
        let fresh = t.begin(&tp(), 1, 1).unwrap();
        assert_eq!(t.in_flight(), 5);
        for old in &d[1..] {
            assert_eq!(t.ack(old), AckResult::Stale, "late acks never move the new owner's watermark");
        }
        assert_eq!(t.in_flight(), 1, "only the new assignment's message is left");
        assert_eq!(t.ack(&d[1]), AckResult::Stale, "a repeated late ack changes nothing");
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.ack(&fresh), AckResult::Done);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn the_oldest_unfinished_message_is_timed_and_an_idle_partition_is_not_stalled() {
        let mut t = OffsetTracker::new();
        let other = TopicPartition::new("tickets", 1);
        t.assign(tp());
        t.assign(other.clone());
        let a = t.begin_at(&tp(), 0, 1, 1_000).unwrap();
        let _b = t.begin_at(&tp(), 1, 1, 5_000).unwrap();
        assert_eq!(t.oldest_unfinished(11_000), vec![(tp(), Some(10_000)), (other.clone(), None)]);
        t.ack(&a);
        assert_eq!(t.oldest_unfinished(11_000)[0], (tp(), Some(6_000)), "the next unfinished one");
        let c = t.begin_at(&other, 7, 2, 9_000).unwrap();
        assert_eq!(t.ack(&c), AckResult::Counted);
        assert_eq!(t.oldest_unfinished(11_000)[1], (other, Some(2_000)), "half-acknowledged is unfinished");
    }

    #[test]
    fn watermark_moves_only_over_a_done_prefix() {
        let mut t = OffsetTracker::new();
        t.assign(tp());
        let d: Vec<_> = (10..15).map(|o| t.begin(&tp(), o, 1).unwrap()).collect();
        assert_eq!(t.committable(), vec![], "nothing done yet: 10 is the position, already committed-equivalent");
        assert_eq!(t.ack(&d[2]), AckResult::Done);
        assert_eq!(t.ack(&d[1]), AckResult::Done);
        assert_eq!(t.committable(), vec![], "10 is still pending");
        assert_eq!(t.ack(&d[0]), AckResult::Done);
        assert_eq!(t.committable(), vec![(tp(), 13)]);
        t.committed(&tp(), 13);
        assert_eq!(t.committable(), vec![]);
        t.ack(&d[4]);
        t.ack(&d[3]);
        assert_eq!(t.committable(), vec![(tp(), 15)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn uncommitted_counts_every_consumed_message_until_a_commit_covers_it() {
        let mut t = OffsetTracker::new();
        t.assign(tp());
        let d: Vec<_> = (0..6).map(|o| t.begin(&tp(), o, 1).unwrap()).collect();
        assert_eq!((t.in_flight(), t.uncommitted()), (6, 6));
        t.ack(&d[0]);
        t.ack(&d[1]);
        t.ack(&d[3]);
        assert_eq!((t.in_flight(), t.uncommitted()), (3, 6), "done is not committed: a crash replays them too");
        assert_eq!(t.committable(), vec![(tp(), 2)]);
        t.committed(&tp(), 2);
        assert_eq!(t.uncommitted(), 4, "2..6: the commit covers 0 and 1 only");
        t.ack(&d[2]);
        t.committed(&tp(), 4);
        assert_eq!((t.in_flight(), t.uncommitted()), (2, 2));
        t.committed(&tp(), 3);
        assert_eq!(t.uncommitted(), 2, "an older commit confirmed late changes nothing");
        let abandoned = t.revoke(&tp()).unfinished;
        assert_eq!((abandoned, t.uncommitted()), (2, 2), "revoked but still in the pipeline: memory");
        t.ack(&d[4]);
        t.ack(&d[5]);
        assert_eq!(t.uncommitted(), 0);
    }

    #[test]
    fn a_commit_inside_the_done_prefix_leaves_the_rest_of_it_uncommitted() {
        let mut t = OffsetTracker::new();
        t.assign(tp());
        let d: Vec<_> = (0..4).map(|o| t.begin(&tp(), o, 1).unwrap()).collect();
        d.iter().for_each(|d| assert_eq!(t.ack(d), AckResult::Done));
        assert_eq!((t.in_flight(), t.uncommitted()), (0, 4));
        t.committed(&tp(), 2);
        assert_eq!(t.uncommitted(), 2, "2 and 3 are done, not committed: a crash replays them");
        assert_eq!(t.committable(), vec![(tp(), 4)]);
    }

    #[test]
    fn revoking_abandons_only_unfinished_messages_and_remembers_nothing_when_all_are_done() {
        let mut t = OffsetTracker::new();
        t.assign(tp());
        let d: Vec<_> = (0..3).map(|o| t.begin(&tp(), o, 1).unwrap()).collect();
        t.ack(&d[1]);
        t.ack(&d[2]);
        assert_eq!(
            t.revoke(&tp()),
            Revoked { commit: None, unfinished: 1, replayed: 3, uncommitted_done: 0 },
            "1 and 2 are done (behind 0): only 0 is abandoned, all three are read again"
        );
        assert_eq!((t.in_flight(), t.uncommitted()), (1, 1));
        t.ack(&d[0]);
        assert_eq!((t.in_flight(), t.uncommitted()), (0, 0));
        assert!(t.orphans.is_empty());
        t.assign(tp());
        let e = t.begin(&tp(), 3, 1).unwrap();
        t.ack(&e);
        assert_eq!(t.revoke(&tp()), Revoked { commit: Some(4), unfinished: 0, replayed: 0, uncommitted_done: 1 });
        assert!(t.orphans.is_empty(), "nothing unfinished: nothing to remember");
    }

    #[test]
    fn extra_acks_are_refused_for_done_messages_and_other_assignments() {
        let mut t = OffsetTracker::new();
        t.assign(tp());
        let old = t.begin(&tp(), 5, 1).unwrap();
        t.revoke(&tp());
        t.assign(tp());
        let new = t.begin(&tp(), 5, 1).unwrap();
        assert!(!t.add_acks(&old, 1), "a revoked assignment's message is not the new one's");
        assert_eq!(t.ack(&new), AckResult::Done, "one ack finishes it: the old handle added none");
        let a = t.begin(&tp(), 6, 1).unwrap();
        let b = t.begin(&tp(), 7, 1).unwrap();
        assert_eq!(t.ack(&b), AckResult::Done, "done, waiting behind 6");
        assert!(!t.add_acks(&b, 1), "a done message is never made unfinished again");
        t.ack(&a);
        assert_eq!(t.committable(), vec![(tp(), 8)]);
    }

    #[test]
    fn a_partition_shows_as_topic_slash_partition() {
        assert_eq!(TopicPartition::new("tickets", 3).to_string(), "tickets/3");
    }

    #[test]
    fn a_message_with_two_acks_is_done_after_both() {
        let mut t = OffsetTracker::new();
        t.assign(tp());
        let d = t.begin(&tp(), 0, 1).unwrap();
        assert!(t.add_acks(&d, 1), "row + escalation");
        assert_eq!(t.ack(&d), AckResult::Counted);
        assert_eq!(t.committable(), vec![]);
        assert_eq!(t.ack(&d), AckResult::Done);
        assert_eq!(t.committable(), vec![(tp(), 1)]);
        assert_eq!(t.ack(&d), AckResult::Stale, "a third ack is ignored");
    }

    #[test]
    fn late_acks_from_a_revoked_assignment_never_move_the_new_watermark() {
        let mut t = OffsetTracker::new();
        t.assign(tp());
        let old: Vec<_> = (0..5).map(|o| t.begin(&tp(), o, 1).unwrap()).collect();
        t.ack(&old[0]);
        assert_eq!(
            t.revoke(&tp()),
            Revoked { commit: Some(1), unfinished: 4, replayed: 4, uncommitted_done: 1 },
            "commit what is done on revoke; 4 abandoned"
        );
        // Re-assigned: resumes from the committed offset 1.
        t.assign(tp());
        let new: Vec<_> = (1..5).map(|o| t.begin(&tp(), o, 1).unwrap()).collect();
        for d in &old[1..] {
            assert_eq!(t.ack(d), AckResult::Stale);
        }
        assert_eq!(t.committable(), vec![], "old-epoch acks moved nothing");
        t.ack(&new[0]);
        assert_eq!(t.committable(), vec![(tp(), 2)]);
    }

    #[test]
    fn revoke_of_an_unassigned_partition_commits_nothing() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.revoke(&tp()), Revoked::default());
        assert!(t.begin(&tp(), 0, 1).is_none());
    }

    #[test]
    fn gaps_in_offsets_do_not_block_the_watermark() {
        // Compacted topics and transaction markers leave holes.
        let mut t = OffsetTracker::new();
        t.assign(tp());
        let a = t.begin(&tp(), 3, 1).unwrap();
        let b = t.begin(&tp(), 7, 1).unwrap();
        t.ack(&a);
        assert_eq!(t.committable(), vec![(tp(), 7)]);
        t.ack(&b);
        assert_eq!(t.committable(), vec![(tp(), 8)]);
    }

    proptest! {
        /// Whatever order acks arrive in, the committable offset never passes a message that is
        /// not done, and once all are done it is one past the last.
        #[test]
        fn never_commits_past_an_unfinished_message(order in Just((0..60i64).collect::<Vec<_>>()).prop_shuffle(), acks in proptest::collection::vec(1u32..3, 60)) {
            let mut t = OffsetTracker::new();
            t.assign(tp());
            let ds: Vec<_> = (0..60).map(|o| t.begin(&tp(), o, acks[o as usize]).unwrap()).collect();
            let mut done = [false; 60];
            let mut remaining = acks.clone();
            let mut committed = 0;
            for &o in order.iter().chain(order.iter()) {
                if remaining[o as usize] == 0 { continue; }
                t.ack(&ds[o as usize]);
                remaining[o as usize] -= 1;
                if remaining[o as usize] == 0 { done[o as usize] = true; }
                for (_, w) in t.committable() {
                    prop_assert!((0..w).all(|i| done[i as usize]), "committable {} passes an unfinished message", w);
                    t.committed(&tp(), w);
                    committed = w;
                }
                prop_assert_eq!(t.uncommitted(), (60 - committed) as usize, "everything from the commit on is replayable");
                prop_assert_eq!(t.in_flight(), done.iter().filter(|d| !**d).count());
            }
            prop_assert_eq!(t.in_flight(), 0);
        }

        /// Revoked at any moment: the next owner reads again exactly the offsets from the commit
        /// point on if the revoke's commit lands, and from the last confirmed commit on if it is
        /// refused (the rebalance test's replay bound rests on these counts).
        #[test]
        fn a_revoke_counts_exactly_what_the_next_owner_reads_again(order in Just((0..60i64).collect::<Vec<_>>()).prop_shuffle(), acked in 0usize..=60, confirmed in 0i64..=60) {
            let mut t = OffsetTracker::new();
            t.assign(tp());
            let ds: Vec<_> = (0..60).map(|o| t.begin(&tp(), o, 1).unwrap()).collect();
            for &o in &order[..acked] {
                t.ack(&ds[o as usize]);
            }
            let first_unfinished = (0..60).find(|o| !order[..acked].contains(o)).unwrap_or(60);
            let confirmed = confirmed.min(first_unfinished);
            if confirmed > 0 {
                t.committed(&tp(), confirmed);
            }
            let revoked = t.revoke(&tp());
            prop_assert_eq!(revoked.commit, (first_unfinished > confirmed).then_some(first_unfinished));
            prop_assert_eq!(revoked.unfinished, 60 - acked);
            prop_assert_eq!(revoked.replayed, (60 - first_unfinished) as usize);
            prop_assert_eq!(revoked.replayed + revoked.uncommitted_done, (60 - confirmed) as usize);
        }
    }
}
