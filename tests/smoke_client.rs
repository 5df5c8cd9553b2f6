//! The async client against a real redis-server.
mod common;

use ferry::redis::client::Client;
use ferry::redis::command::Command;
use ferry::redis::resp::Frame;
use ferry::redis::url::RedisUrl;

#[tokio::test]
async fn client_pipelines_and_reports_errors() {
    let server = common::RedisServer::start(&["--requirepass", "s3cret"]);
    let url = RedisUrl::parse(&format!("redis://:s3cret@127.0.0.1:{}/2", server.port)).unwrap();
    let mut client = Client::connect(&url).await.unwrap();
    let replies = client
        .pipeline(&[
            Command::from_parts(["SET", "k", "v"]),
            Command::from_parts(["INCR", "k"]),
            Command::from_parts(["GET", "k"]),
        ])
        .await
        .unwrap();
    assert_eq!(replies[0], Frame::Simple("OK".into()));
    assert!(replies[1].error_message().is_some());
    assert_eq!(replies[2], Frame::bulk("v"));
    assert_eq!(
        server.cmd(&["-a", "s3cret", "--no-auth-warning", "-n", "2", "GET", "k"]),
        "v"
    );

    let wrong = RedisUrl::parse(&format!("redis://:nope@127.0.0.1:{}", server.port)).unwrap();
    let err = Client::connect(&wrong)
        .await
        .err()
        .expect("wrong password refused");
    assert!(err.to_string().contains("AUTH"), "{err}");
}
