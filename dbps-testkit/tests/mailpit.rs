//! Real mail over SMTP to the shared Mailpit, read back through its HTTP API.

use std::time::Duration;

use dbps_testkit::{Error, TestMailpit};
use lettre::address::Envelope;
use lettre::message::header::ContentType;
use lettre::message::{Attachment, Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A plain SMTP client of the shared server, the way a service would build one.
fn mailer(mail: &TestMailpit) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(mail.smtp_host())
        .port(mail.smtp_port())
        .timeout(Some(Duration::from_secs(60)))
        .build()
}

fn shop() -> Mailbox {
    "Shop <shop@example.test>".parse().expect("valid mailbox")
}

/// Bytes that do not compress, so that the whole size crosses the wire and the store.
fn noise(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

#[tokio::test]
async fn a_message_sent_over_smtp_reads_back_whole() -> TestResult {
    let mail = dbps_testkit::mailpit().await?;
    let customer = mail.recipient("customer");
    let message_id = format!("order-42.{}@dbps.test", mail.tag());
    let email = Message::builder()
        .from(shop())
        .to(customer.parse()?)
        .subject("Your order 42 has shipped")
        .message_id(Some(format!("<{message_id}>")))
        .multipart(MultiPart::alternative_plain_html(
            String::from("Order 42 is on its way.\nThank you!"),
            String::from("<p>Order <b>42</b> is on its way.</p>"),
        ))?;
    let sent_at = chrono::Utc::now();
    mailer(&mail).send(email).await?;

    let arrived = mail.wait_for(&customer, 1).await?;
    assert_eq!(arrived.len(), 1);
    let summary = &arrived[0];
    assert_eq!(summary.subject, "Your order 42 has shipped");
    assert_eq!(summary.message_id, message_id);
    assert_eq!(summary.from, "shop@example.test");
    assert_eq!(summary.to, [customer.as_str()]);
    assert_eq!(summary.attachments, 0);
    assert!(summary.content.is_none(), "a summary has no bodies");
    let skew = (summary.created - sent_at).num_seconds().abs();
    assert!(
        skew < 60,
        "received {} for a message sent at {sent_at}",
        summary.created
    );

    let message = mail.message(&summary.id).await?;
    assert_eq!(message.id, summary.id);
    assert_eq!(message.message_id, message_id);
    assert_eq!(message.subject, summary.subject);
    let text = message.text().expect("a full message").replace("\r\n", "\n");
    assert_eq!(text.trim_end(), "Order 42 is on its way.\nThank you!");
    assert_eq!(
        message.html().map(str::trim_end),
        Some("<p>Order <b>42</b> is on its way.</p>")
    );
    assert_eq!(message.attachments, 0);

    let raw = String::from_utf8(mail.raw(&summary.id).await?)?;
    assert!(raw.contains(&format!("Message-ID: <{message_id}>\r\n")), "{raw}");
    assert!(raw.contains("Subject: Your order 42 has shipped\r\n"), "{raw}");
    assert!(raw.contains("multipart/alternative"), "{raw}");
    assert_eq!(u64::try_from(raw.len())?, summary.size);
    Ok(())
}

#[tokio::test]
async fn a_five_megabyte_attachment_arrives_intact() -> TestResult {
    let mail = dbps_testkit::mailpit().await?;
    let customer = mail.recipient("customer");
    let invoice = noise(5 * 1024 * 1024);
    let email = Message::builder()
        .from(shop())
        .to(customer.parse()?)
        .subject("Invoice 7")
        .multipart(
            MultiPart::mixed()
                .singlepart(lettre::message::SinglePart::plain(String::from(
                    "Your invoice is attached.",
                )))
                .singlepart(
                    Attachment::new(String::from("invoice-7.pdf"))
                        .body(invoice.clone(), ContentType::parse("application/pdf")?),
                ),
        )?;
    mailer(&mail).send(email).await?;

    let arrived = mail.wait_for(&customer, 1).await?;
    assert_eq!(arrived[0].attachments, 1);
    // Base64 makes the source a third larger than the attachment.
    assert!(
        arrived[0].size > 5 * 1024 * 1024 * 4 / 3,
        "source of {} bytes",
        arrived[0].size
    );

    let message = mail.message(&arrived[0].id).await?;
    let content = message.content.as_ref().expect("a full message");
    assert_eq!(content.text.trim_end(), "Your invoice is attached.");
    assert_eq!(content.attachments.len(), 1);
    let attachment = &content.attachments[0];
    assert_eq!(attachment.file_name, "invoice-7.pdf");
    assert_eq!(attachment.content_type, "application/pdf");
    assert_eq!(attachment.size, 5 * 1024 * 1024);
    let bytes = mail.attachment(&message.id, &attachment.part_id).await?;
    assert!(bytes == invoice, "the attachment came back changed");
    Ok(())
}

#[tokio::test]
async fn envelope_recipients_and_copies_are_recipients_too() -> TestResult {
    let mail = dbps_testkit::mailpit().await?;
    let (to, cc, hidden) = (mail.recipient("to"), mail.recipient("cc"), mail.recipient("hidden"));
    let email = Message::builder()
        .from(shop())
        .to(to.parse()?)
        .cc(cc.parse()?)
        .subject("Three ways")
        .body(String::from("hello"))?;
    // The envelope names one more recipient than the headers do, as a Bcc does.
    let envelope = Envelope::new(
        Some("shop@example.test".parse()?),
        vec![to.parse()?, cc.parse()?, hidden.parse()?],
    )?;
    mailer(&mail).send_raw(&envelope, &email.formatted()).await?;

    for address in [&to, &cc, &hidden] {
        let arrived = mail.wait_for(address, 1).await?;
        assert_eq!(arrived.len(), 1, "{address}");
        assert_eq!(arrived[0].subject, "Three ways");
    }
    let message = &mail.messages_to(&hidden).await?[0];
    assert_eq!(message.cc, [cc.as_str()]);
    assert_eq!(message.bcc, [hidden.as_str()]);
    assert_eq!(mail.messages().await?.len(), 1, "one message, whoever it reached");
    Ok(())
}

#[tokio::test]
async fn two_tests_do_not_see_each_others_mail() -> TestResult {
    let first = dbps_testkit::mailpit().await?;
    let second = dbps_testkit::mailpit().await?;
    assert_ne!(first.tag(), second.tag());
    let (to_first, to_second) = (first.recipient("inbox"), second.recipient("inbox"));
    assert_ne!(to_first, to_second);

    let smtp = mailer(&first);
    for (to, subject) in [
        (&to_first, "for the first"),
        (&to_second, "for the second"),
        (&to_second, "again"),
    ] {
        let email = Message::builder()
            .from(shop())
            .to(to.parse()?)
            .subject(subject)
            .body(String::from("hello"))?;
        smtp.send(email).await?;
    }

    let mine = first.wait_for(&to_first, 1).await?;
    let theirs = second.wait_for(&to_second, 2).await?;
    assert_eq!(
        mine.iter().map(|m| m.subject.as_str()).collect::<Vec<_>>(),
        ["for the first"]
    );
    assert_eq!(
        theirs.iter().map(|m| m.subject.as_str()).collect::<Vec<_>>(),
        ["for the second", "again"]
    );
    assert_eq!(first.messages().await?.len(), 1);
    assert_eq!(second.messages().await?.len(), 2);

    // A test cannot read another's addresses.
    assert!(first.owns(&to_first) && !first.owns(&to_second));
    let error = first
        .messages_to(&to_second)
        .await
        .expect_err("not the first test's address");
    assert!(matches!(error, Error::ForeignAddress { .. }), "{error}");
    assert!(error.to_string().contains("use TestMailpit::recipient"), "{error}");
    Ok(())
}

#[tokio::test]
async fn wait_for_times_out_with_a_clear_error() -> TestResult {
    let mail = dbps_testkit::mailpit().await?;
    let nobody = mail.recipient("nobody");
    let started = std::time::Instant::now();
    let error = mail
        .wait_for_within(&nobody, 1, Duration::from_secs(2))
        .await
        .expect_err("nothing was sent");
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(matches!(error, Error::TimedOut { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!(
            "timed out after 2s waiting for 1 message to {nobody} in Mailpit at "
        )),
        "{message}"
    );
    assert!(message.ends_with("(0 arrived)"), "{message}");
    Ok(())
}

#[tokio::test]
async fn mail_is_deleted_by_address_and_with_the_handle() -> TestResult {
    let mail = dbps_testkit::mailpit().await?;
    let (kept, removed) = (mail.recipient("kept"), mail.recipient("removed"));
    let smtp = mailer(&mail);
    for to in [&kept, &removed, &removed] {
        let email = Message::builder()
            .from(shop())
            .to(to.parse()?)
            .subject("to delete")
            .body(String::from("hello"))?;
        smtp.send(email).await?;
    }
    mail.wait_for(&removed, 2).await?;
    let kept_id = mail.wait_for(&kept, 1).await?.remove(0).id;

    assert_eq!(mail.delete_to(&removed).await?, 2);
    assert!(mail.messages_to(&removed).await?.is_empty());
    assert_eq!(mail.messages_to(&kept).await?.len(), 1);

    // Dropping the handle deletes the rest of the test's mail.
    drop(mail);
    let other = dbps_testkit::mailpit().await?;
    let error = other.message(&kept_id).await.expect_err("deleted with the handle");
    assert!(matches!(error, Error::Mailpit { .. }), "{error}");
    Ok(())
}
