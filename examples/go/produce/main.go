// Produces MAILBUS_COUNT (default 1) email.requested records for MAILBUS_ACCOUNT
// to MAILBUS_TO and prints one JSON line per record once the broker acked it.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/twmb/franz-go/pkg/kgo"

	"example.invalid/mailbus-examples/contract"
)

type Address struct {
	Email string  `avro:"email"`
	Name  *string `avro:"name"`
}

// EmailRequested holds the fields this example sets; the others are written
// with their schema defaults.
type EmailRequested struct {
	EventID     string    `avro:"event_id"`
	MessageID   string    `avro:"message_id"`
	OccurredAt  time.Time `avro:"occurred_at"`
	AccountID   string    `avro:"account_id"`
	To          []Address `avro:"to"`
	Subject     *string   `avro:"subject"`
	Text        *string   `avro:"text"`
	RequestedAt time.Time `avro:"requested_at"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "produce:", err)
		os.Exit(1)
	}
}

func run() error {
	schema, err := contract.Load("email.requested", 1)
	if err != nil {
		return err
	}
	opts, err := contract.Connection()
	if err != nil {
		return err
	}
	// Keyed records go where Kafka's Java client puts them: murmur2 of the key.
	opts = append(opts, kgo.RecordPartitioner(kgo.StickyKeyPartitioner(nil)))
	client, err := kgo.NewClient(opts...)
	if err != nil {
		return err
	}
	defer client.Close()

	topic := contract.Env("MAILBUS_TOPIC_PREFIX", "") + "email.requested"
	account, to := os.Getenv("MAILBUS_ACCOUNT"), os.Getenv("MAILBUS_TO")
	count, err := strconv.Atoi(contract.Env("MAILBUS_COUNT", "1"))
	if err != nil {
		return err
	}
	subject, text := "Hello from Go", "Sent by the franz-go example."
	for range count {
		now := time.Now().UTC()
		request := EmailRequested{
			EventID: uuid.NewString(), MessageID: uuid.NewString(), OccurredAt: now,
			AccountID: account, To: []Address{{Email: to}},
			Subject: &subject, Text: &text, RequestedAt: now,
		}
		value, err := schema.Encode(request)
		if err != nil {
			return err
		}
		record := &kgo.Record{Topic: topic, Key: []byte(account), Value: value}
		if err := client.ProduceSync(context.Background(), record).FirstErr(); err != nil {
			return err
		}
		line, _ := json.Marshal(map[string]any{"message_id": request.MessageID,
			"event_id": request.EventID, "partition": record.Partition, "offset": record.Offset})
		fmt.Println(string(line))
	}
	return nil
}
