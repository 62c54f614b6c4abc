//! Arbitrary bytes as a field table: the non-recursive scan in
//! `warren_proto::table_limits` and `amq-protocol`'s recursive parser must
//! agree. A table the scan accepts, the parser accepts with the same length;
//! a table the scan calls malformed, the parser refuses. A table the scan
//! finds too deep is not parsed: parsing it is what the limit prevents, and
//! the parser has no limit to agree with.
//!
//! Input: one byte that chooses the depth limit (1 to 64), then the table.

#![no_main]

use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::parsing::parse_field_table;
use cookie_factory::gen_simple;
use libfuzzer_sys::fuzz_target;
use warren_proto::{TABLE_DEPTH_CEILING, TableError, TableLimits, table_limits};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, table)) = data.split_first() else {
        return;
    };
    let depth_max = 1 + u32::from(selector) % TABLE_DEPTH_CEILING;
    let limits = TableLimits::new(depth_max, u32::MAX);
    match table_limits::scan_field_table(table, &limits) {
        Ok(length) => {
            let (rest, parsed) = parse_field_table(table)
                .unwrap_or_else(|error| panic!("the scan accepts, the parser refuses: {error}"));
            assert_eq!(
                table.len() - rest.len(),
                length,
                "the two disagree on the length"
            );
            // What the broker re-encodes (with duplicate keys merged) must
            // pass the same limits again.
            let encoded = gen_simple(gen_field_table(&parsed), Vec::new()).unwrap();
            assert_eq!(
                table_limits::scan_field_table(&encoded, &limits),
                Ok(encoded.len())
            );
        }
        Err(TableError::Malformed) => {
            assert!(
                parse_field_table(table).is_err(),
                "the scan calls malformed a table the parser accepts"
            );
        }
        Err(TableError::TooDeep { .. }) => {}
        Err(error @ TableError::HeadersTooLarge { .. }) => {
            panic!("a bare table cannot be headers: {error}")
        }
    }
});
