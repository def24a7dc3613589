//! `weft-sqlite-compat DB [SQL ...]`: opens `DB` with the SQLite this program bundles and
//! runs each SQL argument in turn, printing every result row as tab-separated text and then
//! `ok`; the first error is printed on stderr with the statement, and the exit status is 1.
//! With no SQL it only prints the library version, and the schema once it parsed.
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((db, statements)) = args.split_first() else {
        eprintln!("usage: weft-sqlite-compat DB [SQL ...]");
        return ExitCode::from(2);
    };
    let v = sqlite::version();
    println!("sqlite {}.{}.{}", v / 1_000_000, v / 1_000 % 1_000, v % 1_000);
    let connection = match sqlite::open(db) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot open {db}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The first statement makes SQLite parse the whole schema, as any application's would.
    let mut all = vec!["SELECT type, name FROM sqlite_master ORDER BY type, name".to_owned()];
    all.extend(statements.iter().cloned());
    for sql in &all {
        let result = connection.iterate(sql, |pairs| {
            let line: Vec<String> = pairs.iter().map(|(_, v)| v.unwrap_or("NULL").to_owned()).collect();
            println!("{}", line.join("\t"));
            true
        });
        if let Err(e) = result {
            eprintln!("{sql}: {e}");
            return ExitCode::FAILURE;
        }
    }
    println!("ok");
    ExitCode::SUCCESS
}
