// Reads email.confirmed from the beginning until it has a verdict for every
// message id given as an argument, printing each as a JSON line. Exits 1 if
// MAILBUS_TIMEOUT seconds (default 120) pass first. It joins no consumer
// group, so the principal needs only READ on the topic.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"example.invalid/mailbus-examples/contract"
)

type EmailConfirmed struct {
	EventID           string     `avro:"event_id"`
	MessageID         string     `avro:"message_id"`
	OccurredAt        time.Time  `avro:"occurred_at"`
	AccountID         string     `avro:"account_id"`
	Outcome           string     `avro:"outcome"`
	Evidence          string     `avro:"evidence"`
	RequestedAt       *time.Time `avro:"requested_at"`
	SentAt            time.Time  `avro:"sent_at"`
	DeliveredAt       *time.Time `avro:"delivered_at"`
	SentToDeliveredUs *int64     `avro:"sent_to_delivered_us"`
	RequestedToDelUs  *int64     `avro:"requested_to_delivered_us"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "consume:", err)
		os.Exit(1)
	}
}

func run() error {
	schema, err := contract.Load("email.confirmed", 1)
	if err != nil {
		return err
	}
	opts, err := contract.Connection()
	if err != nil {
		return err
	}
	topic := contract.Env("MAILBUS_TOPIC_PREFIX", "") + "email.confirmed"
	opts = append(opts, kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	client, err := kgo.NewClient(opts...)
	if err != nil {
		return err
	}
	defer client.Close()

	waiting := map[string]bool{}
	for _, id := range os.Args[1:] {
		waiting[id] = true
	}
	seconds, err := strconv.Atoi(contract.Env("MAILBUS_TIMEOUT", "120"))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(seconds)*time.Second)
	defer cancel()
	for len(waiting) > 0 {
		fetches := client.PollFetches(ctx)
		if ctx.Err() != nil {
			return fmt.Errorf("no verdict within %d s for %d message(s)", seconds, len(waiting))
		}
		if err := fetches.Err(); err != nil {
			return err
		}
		for _, record := range fetches.Records() {
			var verdict EmailConfirmed
			if err := schema.Decode(record.Value, &verdict); err != nil {
				return fmt.Errorf("%s/%d/%d: %w", record.Topic, record.Partition, record.Offset, err)
			}
			if !waiting[verdict.MessageID] {
				continue
			}
			delete(waiting, verdict.MessageID)
			line, _ := json.Marshal(map[string]any{"message_id": verdict.MessageID,
				"event_id": verdict.EventID, "account_id": verdict.AccountID,
				"outcome": verdict.Outcome, "evidence": verdict.Evidence,
				"sent_to_delivered_us": verdict.SentToDeliveredUs})
			fmt.Println(string(line))
		}
	}
	return nil
}
