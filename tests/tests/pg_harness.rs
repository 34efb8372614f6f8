//! The PostgreSQL harness itself: each call gets its own database, which accepts connections on a server
//! that keeps fsync on (so crash tests against it mean something).

use cordon_tests::pg;

/// One value from `sql` on the database at `url`, via psql.
async fn query(url: &str, sql: &str) -> String {
    let psql = pg::psql().expect("a database was made, so psql exists");
    let out = tokio::process::Command::new(psql)
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
        .output()
        .await
        .expect("run psql");
    assert!(out.status.success(), "psql {url} -c {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("psql prints UTF-8").trim().to_string()
}

#[tokio::test]
async fn a_private_database_accepts_connections() {
    let Some(url) = pg::database("pg_harness").await else { return };
    assert_eq!(query(&url, "SELECT 1").await, "1");
    assert_eq!(query(&url, "SHOW fsync").await, "on");
    let tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'";
    assert_eq!(query(&url, tables).await, "0", "a new database is empty");

    let other = pg::database("pg_harness").await.expect("PostgreSQL was available a moment ago");
    assert_ne!(query(&url, "SELECT current_database()").await, query(&other, "SELECT current_database()").await);
}
